"""``fedbip-server schedule ...``: run FED's rounds on a schedule (HF Jobs, or a printed
GitHub Actions / cron / Docker / uv definition). Thin over ``fedbip_hub.scheduling.jobs``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli._common import JsonOption, err_console, handle_errors, new_app, out_console, print_json
from fedbip_hub.scheduling.jobs import (
    DEFAULT_FLAVOR,
    DEFAULT_PYTHON,
    DEFAULT_SCHEDULE,
    DEFAULT_TIMEOUT,
)
from server_job._options import (
    FlavorOption,
    ImageOption,
    InstallOption,
    JobTokenOption,
    NamespaceOption,
    PackageOption,
    PythonOption,
    TimeoutOption,
    TokenOption,
    job_options,
)

schedule_app = new_app(
    "schedule", "Run FED's rounds on a schedule: an HF Jobs scheduled job (create, list, "
    "inspect, suspend, resume, delete), or a GitHub Actions / cron / Docker / uv definition "
    "(print).")


FedArgument = Annotated[str, typer.Argument(
    show_default=False, help="Federation: org/name on the Hub, or a local folder.")]
JobIdArgument = Annotated[str, typer.Argument(
    show_default=False, help="Scheduled job id (from `schedule list`).")]
EveryOption = Annotated[str, typer.Option(
    "--every", show_default=False,
    help='"@hourly", "@daily", ... or a cron expression ("*/30 * * * *", UTC).')]


@schedule_app.command("create")
@handle_errors
def schedule_create(
    fed: FedArgument,
    every: EveryOption,
    flavor: FlavorOption = DEFAULT_FLAVOR,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    image: ImageOption = None,
    python: PythonOption = DEFAULT_PYTHON,
    package: PackageOption = None,
    install: InstallOption = True,
    namespace: NamespaceOption = None,
    token: TokenOption = None,
    job_token: JobTokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create the HF Jobs scheduled job that runs FED's rounds.

    The job runs `fedbip-server run FED` with the token as its HF_TOKEN secret, never in
    its command or environment, and never two runs at once.

    Examples:

      fedbip-server schedule create acme/fed --every @hourly

      fedbip-server schedule create acme/fed --every "*/30 * * * *" --flavor t4-small
    """
    from fedbip_hub.scheduling import jobs as scheduling

    options = job_options(flavor, timeout, image, python, package, install, namespace)
    job = scheduling.create_schedule(fed, every, options, token=token, job_token=job_token)
    _print_schedule_result(job, "Created", json_output)
    if not json_output:
        err_console.print(f"Watch it with `fedbip-server schedule inspect {job['id']}` and "
                          "each run with `hf jobs logs <job id>`.", highlight=False)


@schedule_app.command("list")
@handle_errors
def schedule_list(
    fed: Annotated[str | None, typer.Argument(
        show_default=False, help="Only FED's scheduled jobs (default: all fedbip ones).")
    ] = None,
    namespace: NamespaceOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """List the fedbip scheduled jobs (of FED when given).

    Examples:

      fedbip-server schedule list

      fedbip-server schedule list acme/fed --json
    """
    from fedbip_hub.scheduling import jobs as scheduling

    jobs = scheduling.list_schedules(fed, namespace=namespace, token=token)
    if json_output:
        print_json({"ok": True, "scheduled_jobs": jobs})
    else:
        _print_schedules(jobs)


@schedule_app.command("inspect")
@handle_errors
def schedule_inspect(job_id: JobIdArgument, namespace: NamespaceOption = None,
                     token: TokenOption = None, json_output: JsonOption = False) -> None:
    """Show one scheduled job.

    Examples:

      fedbip-server schedule inspect 6548b2a4f1c1b3e0a2d0c001
    """
    from fedbip_hub.scheduling import jobs as scheduling

    job = scheduling.inspect_schedule(job_id, namespace=namespace, token=token)
    _print_schedule_result(job, "", json_output)


def _manage(action: str, verb: str, summary: str):
    """``schedule suspend|resume|delete ID``: one HF Jobs call each."""

    @handle_errors
    def command(job_id: JobIdArgument, namespace: NamespaceOption = None,
                token: TokenOption = None, json_output: JsonOption = False) -> None:
        from fedbip_hub.scheduling import jobs as scheduling

        job = scheduling.manage_schedule(action, job_id, namespace=namespace, token=token)
        _print_schedule_result(job, verb, json_output)

    command.__name__ = f"schedule_{action}"
    command.__doc__ = (f"{summary}\n\nExamples:\n\n  fedbip-server schedule {action} "
                       "6548b2a4f1c1b3e0a2d0c001\n")
    return command


for _action, _verb, _summary in (("suspend", "Suspended", "Pause a scheduled job."),
                                 ("resume", "Resumed", "Resume a paused scheduled job."),
                                 ("delete", "Deleted", "Delete a scheduled job.")):
    schedule_app.command(_action)(_manage(_action, _verb, _summary))


@schedule_app.command("print")
@handle_errors
def schedule_print(
    kind: Annotated[str, typer.Argument(
        show_default=False,
        help="What to write: a GitHub Actions workflow, a crontab line, a Dockerfile or a "
        "uv script.")],
    fed: FedArgument,
    every: Annotated[str, typer.Option(
        "--every", help='"@hourly", "@daily", ... or a cron expression (UTC).')
    ] = DEFAULT_SCHEDULE,
    out: Annotated[Path | None, typer.Option(
        "--out", show_default=False, dir_okay=False, help="Write to this file.")] = None,
    flavor: FlavorOption = DEFAULT_FLAVOR,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    image: ImageOption = None,
    python: PythonOption = DEFAULT_PYTHON,
    package: PackageOption = None,
    install: InstallOption = True,
    namespace: NamespaceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Print a GitHub Actions workflow, crontab line, Dockerfile or uv script for FED.

    Examples:

      fedbip-server schedule print github acme/fed --out .github/workflows/fedbip.yml

      fedbip-server schedule print cron ~/myfed --every @daily
    """
    options = job_options(flavor, timeout, image, python, package, install, namespace)
    _print_template(fed, kind, every, options, out, json_output)


def _print_template(fed: str, kind: str, every: str, options, out: Path | None,
                    json_output: bool) -> None:
    from importlib.resources import files

    from fedbip_hub.errors import ConfigError, did_you_mean
    from fedbip_hub.scheduling import jobs as scheduling

    if kind not in scheduling.TEMPLATES:
        raise ConfigError(f"unknown template {kind!r}.{did_you_mean(kind, scheduling.TEMPLATES)}",
                          hint=f"Use one of {', '.join(scheduling.TEMPLATES)}.")
    template = files("server_job").joinpath("templates", scheduling.TEMPLATES[kind][0])
    text = scheduling.render_template(
        template.read_text(encoding="utf-8"),
        scheduling.template_values(fed, schedule=every, options=options))
    filename = scheduling.template_filename(kind, fed)
    warnings = scheduling.template_warnings(kind, fed)
    if not json_output:
        for warning in warnings:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        if json_output:
            print_json({"ok": True, "kind": kind, "path": str(out), "warnings": warnings})
        else:
            err_console.print(f"Wrote {escape(str(out))} ({kind}; suggested name "
                              f"{escape(filename)}).", highlight=False)
        return
    if json_output:
        print_json({"ok": True, "kind": kind, "filename": filename, "content": text,
                    "warnings": warnings})
        return
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_schedules(jobs: list[dict]) -> None:
    from rich.table import Table

    if not jobs:
        out_console.print("No fedbip scheduled jobs.")
        return
    table = Table("id", "federation", "schedule", "state", "flavor", "last run", "next run")
    for job in jobs:
        table.add_row(job["id"], str(job.get("federation") or "–"), str(job["schedule"]),
                      "suspended" if job["suspended"] else "active", str(job["flavor"]),
                      str((job.get("last_run") or {}).get("at") or "–"),
                      str(job.get("next_run_at") or "–"))
    out_console.print(table)


def _print_schedule_result(job: dict, verb: str, json_output: bool) -> None:
    if json_output:
        print_json({"ok": True, "scheduled_job": job})
        return
    if job.get("deleted"):
        out_console.print(f"Deleted scheduled job {job['id']}.")
        return
    state = "suspended" if job["suspended"] else "active"
    out_console.print(f"{verb + ' s' if verb else 'S'}cheduled job {job['id']} "
                      f"({escape(str(job['schedule']))}, {state}) in {job['namespace']}:",
                      highlight=False)
    out_console.print(f"  image {escape(str(job['image']))} on {job['flavor']}, secrets "
                      f"{', '.join(job['secrets']) or 'none'}", highlight=False)
    out_console.print(f"  command {escape(shlex.join(job['command']))}", highlight=False,
                      soft_wrap=True)
