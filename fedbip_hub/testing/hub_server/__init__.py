"""A local HTTP server that speaks enough of the Hugging Face Hub API for tests and demos.

It serves what `huggingface_hub.HfApi`, `hf_hub_download`, `snapshot_download` and
`peft.PeftModel.from_pretrained` use, for model, dataset and space repos: whoami, repo
creation and deletion, repo info, preupload (every file is "regular": no LFS, no Xet),
ndjson commits with `parentCommit` checks (HTTP 412), pull-request commits, refs,
commit history, branches, tags, tree listings, paths-info, `list_models(author=, search=,
expand=)` (paginated by `Link` headers)
and `resolve` downloads (HEAD and GET, with Range). It also keeps the Jobs and webhooks
APIs that `HfApi` calls (`run_job`, `create_scheduled_job`, `list_scheduled_jobs`,
`inspect_scheduled_job`, `suspend|resume|trigger|delete_scheduled_job`,
`create|list|get|update|enable|disable|delete_webhook`): nothing ever runs, the server
only records what was asked.

State lives in memory. Every commit is a full snapshot (path -> bytes) with its parent,
so any old commit id stays downloadable. Tests drive it from Python:

    server = HubServer().start()
    server.inject_fault(method="GET", path_pattern=r"/resolve/", status=503, times=1)
    server.add_token("hf_other", "bob", orgs=["bob-org"])
    server.revoke_token("hf_other")
    server.requests  # [(method, path, status), ...]
    server.request_counts()  # {"api": ..., "downloads": ..., "commits": ...}, as rate-limited
    server.inject_fault(path_pattern=r"/api/", status=429, ratelimit=(0, 2))  # RateLimit headers
    server.create_repo("fedorg/x", files={"a.txt": "a"})  # set-up without HTTP
    server.head("fedorg/x"), server.files("fedorg/x"), server.commits("fedorg/x")
    server.scheduled_jobs, server.jobs, server.webhooks  # stored state, secrets included
    server.api_calls  # [ApiCall(method, path, query, body)] for the Jobs/webhooks routes
    server.stop()

It uses the standard library only. Tokens are never logged or stored in the request log.
`api_calls` keeps the JSON bodies of Jobs and webhooks requests exactly as sent, secret
values included (that is where a test checks a token went only where it should); the
server's replies name secrets but never echo their values, as the real Hub does.
Run it by hand with `python -m fedbip_hub.testing.hub_server --port 8765`.

One module per concern: `state` (commits, repos, tokens), `transport` (HTTP plumbing),
`routes` (the route tables), `server` (`HubServer`: the app wiring), `access` (tokens
and access control), `repos` and `commits`, `lfs` (preupload: no LFS transfers),
`files` (trees, paths-info, downloads), `listings` (repo info, paged listings with
`expand`), `jobs`, `webhooks`, `cards` (validate-yaml), `faults` (fault injection),
`counting` (the request log and rate-limit counts) and `cli`.
"""

from fedbip_hub.testing.hub_server.access import (
    DEFAULT_ORGS,
    DEFAULT_TOKEN,
    DEFAULT_USER,
    INVALID_CREDENTIALS,
)
from fedbip_hub.testing.hub_server.cli import main
from fedbip_hub.testing.hub_server.counting import ApiCall, RequestRecord
from fedbip_hub.testing.hub_server.faults import Fault
from fedbip_hub.testing.hub_server.server import HubServer
from fedbip_hub.testing.hub_server.state import DEFAULT_BRANCH, Commit, git_blob_oid

__all__ = [
    "DEFAULT_BRANCH",
    "DEFAULT_ORGS",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "INVALID_CREDENTIALS",
    "ApiCall",
    "Commit",
    "Fault",
    "HubServer",
    "RequestRecord",
    "git_blob_oid",
    "main",
]
