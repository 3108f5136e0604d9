"""Reads: revision checks and downloads as single GETs and HEADs on the shared client
(not hf_hub_download, whose retries and error wrapping hide the Hub's answer), and
pinned folders of known files fetched without a listing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedbip_hub.stores.hub.failures import _EntryMissing
from fedbip_hub.stores.hub.trees import HubTrees


class HubReads(HubTrees):
    """Downloads and revision checks of a HubStore."""

    def check_revision(self, repo_id: str, revision: str, probe: str) -> None:
        """One HEAD of ``probe``'s resolve URL, never answered from a cache: a file
        request (the Hub counts it with downloads), not an API call. A revision that
        exists without ``probe`` answers EntryNotFound, which is no error here."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(repo_id, probe, revision=revision, endpoint=self.endpoint)

        def ask() -> None:
            response = get_session().head(url, headers=build_hf_headers(token=self._token),
                                          follow_redirects=False)
            if response.status_code >= 400:
                hf_raise_for_status(response)

        try:
            self._call(repo_id, "check a revision", ask)
        except _EntryMissing:
            return

    def fetch_folder(self, repo_id: str, revision: str, subfolder: str = "",
                     *, only: Sequence[str] | None = None) -> Path:
        """As ``Store.fetch_folder``; with ``only`` and no cached tree, each named file is
        downloaded straight away (a file the revision lacks answers 404 and is left out),
        so reading a pinned adapter costs downloads, not API calls."""
        if only is None or self._cached_tree(repo_id, revision) is not None:
            return super().fetch_folder(repo_id, revision, subfolder, only=only)
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        root = self._cache_path(repo_id, revision)
        for name in only:
            target = root / f"{prefix}{name}"
            if "/" in name or target.is_file():
                continue
            try:
                self._download_atomic(repo_id, f"{prefix}{name}", revision, target)
            except _EntryMissing:
                continue
        folder = root / prefix if prefix else root
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _download(self, repo_id: str, path: str, revision: str, dest: Path) -> None:
        """One GET of the resolve URL, streamed to ``dest``.

        Not hf_hub_download: when its HEAD fails with nothing cached it retries for about
        23 s (1, 2, 4, 8, 8 s) before giving up with a LocalEntryNotFoundError that hides
        the status (a 403 included), and then keeps a second copy in its own cache.
        """
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)

        def fetch() -> None:
            headers = build_hf_headers(token=self._token)
            with get_session().stream("GET", url, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                with dest.open("wb") as handle:
                    for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
                expected = response.headers.get("Content-Length")
                received = response.num_bytes_downloaded
                if expected is not None and expected.isdigit() and int(expected) != received:
                    raise OSError(f"Consistency check failed: {path} should be {expected} "
                                  f"bytes, got {received}.")

        self._call(repo_id, f"download {path}", fetch)
