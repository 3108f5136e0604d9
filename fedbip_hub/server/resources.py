"""The server's machine running out of something (disk space, a quota, memory, file
handles): one clear error for the whole round, never a per-client skip or a traceback.

Such a failure says nothing about any client's upload, so it must not skip or refuse
one; the round stops where it is, and its lease (already committed) lets the next run
resume it with ``--takeover`` once the operator has made room.
"""

from __future__ import annotations

import errno
import os

from fedbip_hub.errors import ResourceError
from fedbip_hub.secrets import redact

RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EMFILE,
                             errno.ENFILE, errno.ENOMEM, errno.EROFS})


def is_resource_error(exc: BaseException) -> bool:
    """A full disk, a quota, a read-only file system, no memory or no file handles."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError)
                                            and exc.errno in RESOURCE_ERRNOS)


def resource_error(exc: BaseException, doing: str) -> ResourceError:
    """The ResourceError for ``exc`` (see ``is_resource_error``) while ``doing``."""
    if isinstance(exc, MemoryError):
        what, fix = "ran out of memory", "Run the job on a machine (flavor) with more memory"
    else:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        what = f"hit {code} ({os.strerror(exc.errno or 0)}){where}"
        fix = ("Free space on that disk, or point FEDBIP_CACHE, FEDBIP_STAGING_DIR and "
               "TMPDIR at a larger one")
    return ResourceError(
        redact(f"the server {what} while {doing}."),
        hint=f"{fix}, then run the server job again with --takeover (or wait for the "
        "lease to expire): the round resumes where it stopped, nothing is applied twice.")
