"""Run ``fedbip-server run FED`` on a schedule: Hugging Face Jobs, GitHub Actions or cron.

The HF Jobs spec is built here (``job_spec``) and sent with ``HfApi.create_scheduled_job``:

- image ``python:<python>-slim`` and a command that pip-installs fedbip-hub (CPU torch
  first, from PyTorch's CPU index, on CPU flavors) and then ``exec``s
  ``fedbip-server run FED``; with an image that already holds fedbip-hub (the Dockerfile
  template, ``install=False``) the command is just ``fedbip-server run FED``;
- the token travels only in ``secrets={"HF_TOKEN": ...}``: never in the command, the
  environment, the labels, nor anything this module returns or prints;
- ``concurrency=False``: HF Jobs never starts a run while the previous one is running;
- labels ``fedbip=server`` and ``fedbip-federation=<slug>`` find the jobs of a federation.

Templates (GitHub workflow, crontab line, Dockerfile, uv script) are rendered from the
files in ``server_job/templates/`` with ``render_template``.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fedbip_hub import __version__
from fedbip_hub.errors import AuthError, ConfigError, FedbipError, NotFoundError, StoreError
from fedbip_hub.secrets import redact

T = TypeVar("T")

SECRET_NAME = "HF_TOKEN"
DEFAULT_PYTHON = "3.12"
DEFAULT_FLAVOR = "cpu-basic"
DEFAULT_TIMEOUT = "1h"
DEFAULT_SCHEDULE = "@hourly"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROLE_LABELS = {"fedbip": "server"}
FEDERATION_LABEL = "fedbip-federation"
JOB_ENV = {
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_ROOT_USER_ACTION": "ignore",
    "PIP_NO_CACHE_DIR": "1",
}
#: HF Jobs (and Vixie cron) accept these; GitHub Actions needs the cron expression.
SCHEDULE_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?-]+")
_TIMEOUT = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_TIMEOUT_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")

#: ``--print`` kinds: the template file in server_job/templates/ and a suggested file name.
TEMPLATES: dict[str, tuple[str, str]] = {
    "github": ("github-workflow.yml.tmpl", ".github/workflows/fedbip-{slug}.yml"),
    "cron": ("crontab.tmpl", "fedbip-{slug}.crontab"),
    "docker": ("Dockerfile.tmpl", "Dockerfile"),
    "uv": ("uv-script.py.tmpl", "fedbip_round.py"),
}


# -- validation ---------------------------------------------------------------------------
def check_schedule(schedule: str) -> str:
    """A schedule HF Jobs accepts: ``@hourly``-style macros or a five-field cron expression.

    Raises:
        ConfigError: anything else (six-field cron with seconds, ``@reboot``, typos).
    """
    value = " ".join(str(schedule).split())
    if value in SCHEDULE_MACROS:
        return value
    fields = value.split(" ")
    if len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields):
        return value
    raise ConfigError(
        f"invalid schedule {schedule!r}.",
        hint=f"Use one of {', '.join(SCHEDULE_MACROS)} or a five-field cron expression "
        "such as '*/30 * * * *' (minute hour day-of-month month day-of-week, UTC).")


def cron_expression(schedule: str) -> str:
    """The five-field cron form of a schedule (GitHub Actions takes no macros)."""
    value = check_schedule(schedule)
    return SCHEDULE_MACROS.get(value, value)


def timeout_seconds(timeout: str | int) -> int:
    """``"90m"``, ``"2h"``, ``"3600"`` → seconds (HF Jobs' own syntax)."""
    match = _TIMEOUT.fullmatch(str(timeout).strip())
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"invalid timeout {timeout!r}.",
                          hint="Use seconds or a number with s, m, h or d: 3600, 90m, 2h.")
    return int(float(match[1]) * _TIMEOUT_UNITS[match[2]])


def federation_slug(fed: str) -> str:
    """A label-safe name for a federation (Hub repo names never hold ``--``)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", fed.strip("/").replace("/", "--")).strip("-")
    return slug[:90] or "federation"


def check_hub_federation(fed: str) -> str:
    from fedbip_hub.stores import is_hub_address

    if not is_hub_address(fed):
        raise ConfigError(f"{fed} is not a federation on the Hub (org/name).",
                          hint="HF Jobs and webhooks need a Hub federation; for a local "
                          "folder use `fedbip-server schedule print cron FED`.")
    return fed


# -- the job ----------------------------------------------------------------------------
@dataclass
class JobOptions:
    """What the server job runs on.

    Args:
        flavor: HF Jobs hardware (cpu-basic, cpu-upgrade, t4-small, a10g-small, ...).
        timeout: the most one run may take (HF Jobs syntax: 3600, 90m, 2h). Keep it under
            the federation's ``lease_minutes`` so a killed run's round is resumed promptly.
        image: Docker image; default ``python:<python>-slim``.
        python: Python version of the default image and of the templates.
        package: pip requirement that installs fedbip-hub (default: this version).
        install: pip-install ``package`` at the start of each run; turn off for an image
            built from the Dockerfile template, which already holds it.
        namespace: HF user or org that owns (and pays for) the job; default: the token's.
    """

    flavor: str = DEFAULT_FLAVOR
    timeout: str = DEFAULT_TIMEOUT
    image: str | None = None
    python: str = DEFAULT_PYTHON
    package: str | None = None
    install: bool = True
    namespace: str | None = None

    @property
    def resolved_image(self) -> str:
        return self.image or f"python:{self.python}-slim"

    @property
    def resolved_package(self) -> str:
        return self.package or f"fedbip-hub=={__version__}"

    @property
    def gpu(self) -> bool:
        return not self.flavor.startswith("cpu")


def job_command(fed: str, options: JobOptions) -> list[str]:
    """The command the job runs (no secret in it, ever)."""
    run = ["fedbip-server", "run", fed]
    if options.gpu:
        run += ["--device", "cuda"]
    if not options.install:
        return run
    steps = []
    if not options.gpu:  # PyPI's Linux torch wheels pull several GB of CUDA libraries
        steps.append(f"pip install --quiet --index-url {TORCH_CPU_INDEX} torch")
    steps.append(f"pip install --quiet {shlex.quote(options.resolved_package)}")
    steps.append("exec " + shlex.join(run))
    return ["sh", "-c", " && ".join(steps)]


def job_labels(fed: str) -> dict[str, str]:
    return {**ROLE_LABELS, FEDERATION_LABEL: federation_slug(fed)}


def job_name(fed: str) -> str:
    return f"fedbip-{federation_slug(fed)}"


def job_spec(fed: str, options: JobOptions, token: str) -> dict[str, Any]:
    """The keyword arguments of ``HfApi.create_scheduled_job`` / ``run_job`` (but schedule)."""
    return {
        "image": options.resolved_image,
        "command": job_command(fed, options),
        "env": dict(JOB_ENV),
        "secrets": {SECRET_NAME: token},
        "flavor": options.flavor,
        "timeout": timeout_seconds(options.timeout),
        "name": job_name(fed),
        "labels": job_labels(fed),
        "namespace": options.namespace,
    }


# -- talking to HF Jobs -----------------------------------------------------------------
def resolve_token(token: str | None) -> str:
    from huggingface_hub.utils import get_token

    value = token or get_token()
    if not value:
        raise AuthError("no Hugging Face token.",
                        hint="Run `hf auth login` or set HF_TOKEN (a token that may run Jobs "
                        "in the namespace and read/write the federation's repos).")
    return value


def hub_call(action: str, fn: Callable[[], T]) -> T:
    """``fn()`` with huggingface_hub's errors turned into FedbipErrors (token-free)."""
    try:
        return fn()
    except FedbipError:
        raise
    except Exception as exc:  # HfHubHTTPError, network errors, ValueError from HfApi
        raise _translate(exc, action) from None


def _translate(exc: BaseException, action: str) -> FedbipError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    message = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if status in (401, 403):
        return AuthError(f"{action}: the Hub refused the token ({status}: {message}).",
                         hint="Use a token that may run Jobs in this namespace (a write or "
                         "fine-grained token with the jobs permission); pass --namespace "
                         "for an org.")
    if status == 404:
        return NotFoundError(f"{action}: not found ({message}).",
                             hint="Check the id and --namespace (`fedbip-server schedule "
                             "list`).")
    if status in (400, 409, 422):
        return ConfigError(f"{action}: the Hub rejected the request ({status}: {message}).",
                           hint="Check the schedule, --flavor and --timeout.")
    if isinstance(exc, ValueError) and status is None:
        return ConfigError(f"{action}: {message}")
    return StoreError(f"{action} failed: {message}", hint="Retry in a moment.")


def _api(token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def summarize(info: Any) -> dict[str, Any]:
    """A ScheduledJobInfo as JSON-ready data: secret names only, never values."""
    spec = info.job_spec
    labels = dict(spec.labels or {})
    image = spec.docker_image or (f"hf.co/spaces/{spec.space_id}" if spec.space_id else None)
    last = info.status.last_job if info.status else None
    next_run = info.status.next_job_run_at if info.status else None
    return {
        "id": info.id,
        "namespace": info.owner.name if info.owner else None,
        "federation": labels.get(FEDERATION_LABEL),
        "name": labels.get("name"),
        "schedule": info.schedule,
        "suspended": bool(info.suspend),
        "concurrency": bool(info.concurrency),
        "image": image,
        "command": list(spec.command or []),
        "flavor": str(getattr(spec.flavor, "value", spec.flavor)) if spec.flavor else None,
        "timeout": spec.timeout,
        "env": dict(spec.environment or {}),
        "secrets": sorted(spec.secrets or []),
        "labels": labels,
        "created_at": info.created_at.isoformat() if info.created_at else None,
        "last_run": {"id": last.id, "at": last.at.isoformat()} if last else None,
        "next_run_at": next_run.isoformat() if next_run else None,
    }


def create_schedule(fed: str, schedule: str, options: JobOptions, *, token: str | None = None,
                    job_token: str | None = None) -> dict[str, Any]:
    """Create the scheduled job that runs ``fedbip-server run FED`` on ``schedule``.

    Args:
        token: creates the job (default: HF_TOKEN or the stored login).
        job_token: the token the job runs with, sent as the HF_TOKEN secret (default:
            ``token``); typically the server bot's fine-grained token.
    """
    check_hub_federation(fed)
    schedule = check_schedule(schedule)
    token = resolve_token(token)
    spec = job_spec(fed, options, job_token or token)
    info = hub_call("create the scheduled job", lambda: _api(token).create_scheduled_job(
        schedule=schedule, concurrency=False, **spec))
    return summarize(info)


def list_schedules(fed: str | None = None, *, namespace: str | None = None,
                   token: str | None = None) -> list[dict[str, Any]]:
    """fedbip scheduled jobs of a namespace (of one federation when ``fed`` is given)."""
    labels = dict(ROLE_LABELS)
    if fed is not None:
        labels[FEDERATION_LABEL] = federation_slug(fed)
    token = resolve_token(token)
    infos = hub_call("list scheduled jobs", lambda: _api(token).list_scheduled_jobs(
        labels=labels, namespace=namespace))
    return [summarize(i) for i in infos]


def inspect_schedule(job_id: str, *, namespace: str | None = None,
                     token: str | None = None) -> dict[str, Any]:
    token = resolve_token(token)
    return summarize(hub_call(f"inspect scheduled job {job_id}", lambda: _api(
        token).inspect_scheduled_job(scheduled_job_id=job_id, namespace=namespace)))


def manage_schedule(action: str, job_id: str, *, namespace: str | None = None,
                    token: str | None = None) -> dict[str, Any]:
    """``suspend``, ``resume`` or ``delete`` a scheduled job; returns what is left of it."""
    if action not in ("suspend", "resume", "delete"):
        raise ConfigError(f"unknown action {action!r}.")
    token = resolve_token(token)
    api = _api(token)
    method = getattr(api, f"{action}_scheduled_job")
    hub_call(f"{action} scheduled job {job_id}",
             lambda: method(scheduled_job_id=job_id, namespace=namespace))
    if action == "delete":
        return {"id": job_id, "deleted": True}
    return inspect_schedule(job_id, namespace=namespace, token=token)


# -- templates ----------------------------------------------------------------------------
def template_values(fed: str, *, schedule: str = DEFAULT_SCHEDULE,
                    options: JobOptions | None = None,
                    python_executable: str | None = None) -> dict[str, str]:
    """The placeholders of server_job/templates/, filled in for one federation (a local
    folder as its absolute path: cron runs from ``$HOME``, not from where you typed)."""
    from fedbip_hub.stores import is_hub_address
    from fedbip_hub.stores.locations import absolute

    fed = fed if is_hub_address(fed) else absolute(fed)
    options = options or JobOptions()
    timeout = timeout_seconds(options.timeout)
    slug = federation_slug(fed)
    return {
        "FEDERATION": fed,
        "FED_SHELL": shlex.quote(fed),
        "FED_JSON": json.dumps(fed),
        "SLUG": slug,
        "SCHEDULE": check_schedule(schedule),
        "CRON": cron_expression(schedule),
        "PYTHON": options.python,
        "PACKAGE": options.resolved_package,
        "PACKAGE_SHELL": shlex.quote(options.resolved_package),
        "PACKAGE_JSON": json.dumps(options.resolved_package),
        "TORCH_INDEX": TORCH_CPU_INDEX,
        "FLAVOR": options.flavor,
        "TIMEOUT": options.timeout,
        "TIMEOUT_MINUTES": str(max(1, -(-timeout // 60))),
        "SERVER_COMMAND": f"{shlex.quote(python_executable or sys.executable)} -m server_job",
        "SECRET_NAME": SECRET_NAME,
        "VERSION": __version__,
    }


def template_warnings(kind: str, fed: str) -> list[str]:
    """Why a template cannot work for this federation as it stands (empty: it can)."""
    from fedbip_hub.stores import is_hub_address
    from fedbip_hub.stores.locations import absolute

    if kind == "github" and not is_hub_address(fed):
        return [f"{absolute(fed)} is a local folder: GitHub's runner cannot reach it, so "
                "this workflow's rounds would fail. Run the rounds on this machine "
                f"(`fedbip-server schedule print cron {shlex.quote(absolute(fed))}`), or "
                "move the federation to the Hub (org/name)."]
    return []


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Replace every ``@@NAME@@``; an unknown name is an error, not a silent blank."""

    def fill(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise ConfigError(f"template placeholder @@{match[1]}@@ has no value.")
        return values[match[1]]

    return _PLACEHOLDER.sub(fill, text)


def template_filename(kind: str, fed: str) -> str:
    if kind not in TEMPLATES:
        raise ConfigError(f"unknown template {kind!r}.", hint=f"Use one of {', '.join(TEMPLATES)}.")
    return TEMPLATES[kind][1].format(slug=federation_slug(fed))
