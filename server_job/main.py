"""``fedbip-server``: the scheduled job that runs federation rounds. Thin over the library."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli._common import (
    JsonOption,
    VerboseOption,
    err_console,
    handle_errors,
    new_app,
    out_console,
    print_json,
    quiet_dependencies,
)
from fedbip_hub.scheduling.jobs import (
    DEFAULT_FLAVOR,
    DEFAULT_PYTHON,
    DEFAULT_SCHEDULE,
    DEFAULT_TIMEOUT,
)

app = new_app("fedbip-server", "Run FedBip server rounds (from cron, GitHub Actions or HF Jobs).")
# Noun-verb, like `hf jobs scheduled list|delete`.
schedule_app = new_app(
    "schedule", "Run FED's rounds on a schedule: an HF Jobs scheduled job (create, list, "
    "inspect, suspend, resume, delete), or a GitHub Actions / cron / Docker / uv definition "
    "(print).")
webhook_app = new_app(
    "webhook", "Run the server job when a member pushes: a Hub webhook on every member repo "
    "(create, list, delete).")
app.add_typer(schedule_app, name="schedule")
app.add_typer(webhook_app, name="webhook")


@app.callback()
def _root(verbose: VerboseOption = False) -> None:
    """Run FedBip server rounds (from cron, GitHub Actions or HF Jobs)."""
    quiet_dependencies(verbose)


@app.command()
@handle_errors
def run(
    fed: Annotated[str, typer.Argument(help="Federation: org/name on the Hub, or a folder.")],
    dry_run: Annotated[bool, typer.Option(help="Compute everything, write nothing.")] = False,
    takeover: Annotated[bool, typer.Option(
        help="Resume a round whose job died before its lease expired.")] = False,
    device: Annotated[str, typer.Option(
        help="Where the round's maths runs: cpu, cuda or auto (cuda when available).")
    ] = "cpu",
    token: Annotated[str | None, typer.Option(envvar="HF_TOKEN", show_default=False,
                                              help="Hub token (default: HF_TOKEN).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Run one asynchronous round: consume new uploads, personalize every member.

    Started by a Hub webhook (WEBHOOK_PAYLOAD set), it first checks the webhook's secret
    (WEBHOOK_SECRET against the job secret FEDBIP_WEBHOOK_SECRET; a mismatch fails the
    job), then runs only for a client upload and exits 0 otherwise; during another
    job's round it leaves a follow-up request instead. After a round it runs one
    follow-up round per request left while it ran. Started any other way during another
    job's round, it says so and exits 0 (status "in-progress").

    Examples:

      fedbip-server run acme/fed

      fedbip-server run ./myfed --dry-run --json
    """
    from cli._common import progress
    from fedbip_hub.engine.compute import resolve_device
    from fedbip_hub.errors import RoundInProgressError
    from fedbip_hub.federation.repo import Federation
    from fedbip_hub.scheduling.webhooks import JobOutcome, run_job, webhook_from_env

    def step_progress(items, description):
        wrap = progress(description, enabled=not json_output)
        return wrap(items) if wrap else items

    resolve_device(device)  # fail before touching the federation
    fed_obj = Federation.at(fed, token=token)
    try:
        outcome = run_job(fed_obj, **webhook_from_env(), dry_run=dry_run,
                          takeover=takeover, device=device, progress=step_progress,
                          log=(lambda msg: None) if json_output else err_console.print)
    except RoundInProgressError as exc:
        # Another job holds (or just finished) the round: for a scheduler that is not a
        # failure, just as a webhook start that defers to the running job is not.
        outcome = JobOutcome("in-progress", message=" ".join(
            part for part in (exc.message, exc.hint) if part))
    if json_output:
        print_json({"ok": True, **outcome.to_dict()})
        return
    if not outcome.records:
        out_console.print(f"No round run ({outcome.status}): {escape(outcome.message or '')}")
        return
    for index, record in enumerate(outcome.records):
        if index:
            out_console.print("[bold]Follow-up round[/] (triggers arrived during the round):")
        _print_summary(record)


def _print_summary(record: dict) -> None:
    from fedbip_hub.federation.skip_reasons import describe_guards

    status = record["status"]
    if status == "nothing-new":
        out_console.print(f"Nothing new since round {record['round']}; no commit made.")
    else:
        verb = "Would publish" if status == "dry-run" else "Published"
        out_console.print(f"Round {record['round']} {status}: {verb} "
                          f"{len(record.get('outputs') or record.get('clients') or [])} "
                          "personalized adapters.")
        for name, output in (record.get("outputs") or {}).items():
            out_console.print(f"  {name}: {output['repo_id']} @ {str(output['commit'])[:12]}")
        if record.get("unchanged"):  # no fresh update has weight for them: not republished
            out_console.print(f"  unchanged (no fresh update reaches them): "
                              f"{', '.join(sorted(record['unchanged']))}")
    if record.get("hub"):
        out_console.print(f"  Hub: {record['hub']['api_calls']} API calls, "
                          f"{record['hub']['downloads']} file downloads")
    for name, reason in (record.get("skipped") or {}).items():
        out_console.print(f"  [yellow]skipped[/] {name}: {reason}")
    for name, action in describe_guards(record).items():
        out_console.print(f"  [yellow]guarded[/] {name}: {escape(action)}")


# -- scheduling ---------------------------------------------------------------------------
TokenOption = Annotated[str | None, typer.Option(
    envvar="HF_TOKEN", show_default=False,
    help="Hub token that creates and manages jobs (default: HF_TOKEN or `hf auth login`).")]
JobTokenOption = Annotated[str | None, typer.Option(
    "--job-token", envvar="FEDBIP_JOB_TOKEN", show_envvar=True, show_default=False,
    help="Token the job runs with, sent as its HF_TOKEN secret (default: --token). Prefer "
    "the environment variable to the flag, which shells keep in their history.")]
FlavorOption = Annotated[str, typer.Option(
    help="HF Jobs hardware: cpu-basic, cpu-upgrade, t4-small, a10g-small, ...")]
TimeoutOption = Annotated[str, typer.Option(
    help="Longest run (3600, 90m, 2h); keep it under the federation's lease_minutes.")]
ImageOption = Annotated[str | None, typer.Option(
    show_default=False, help="Docker image (default: python:<python>-slim).")]
PythonOption = Annotated[str, typer.Option(
    "--python", help="Python version of the default image and of the templates.")]
PackageOption = Annotated[str | None, typer.Option(
    show_default=False,
    help="pip requirement for fedbip-hub (default: fedbip-hub==<this version>), e.g. "
    "'git+https://github.com/you/fedbip-hub@v0.1.0'.")]
InstallOption = Annotated[bool, typer.Option(
    help="pip-install fedbip-hub at the start of each run; --no-install for an image built "
    "from `schedule print docker`.")]
NamespaceOption = Annotated[str | None, typer.Option(
    show_default=False, help="HF user or org that owns and pays for the job "
    "(default: the token's user).")]


def _job_options(flavor: str, timeout: str, image: str | None, python: str,
                 package: str | None, install: bool, namespace: str | None):
    from fedbip_hub.scheduling.jobs import JobOptions

    return JobOptions(flavor=flavor, timeout=timeout, image=image, python=python,
                      package=package, install=install, namespace=namespace)


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

    options = _job_options(flavor, timeout, image, python, package, install, namespace)
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
    options = _job_options(flavor, timeout, image, python, package, install, namespace)
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


@webhook_app.command("create")
@handle_errors
def webhook_create(
    fed: Annotated[str, typer.Argument(
        show_default=False, help="Federation (org/name) whose member repos to watch.")],
    job_id: Annotated[str | None, typer.Option(
        "--job-id", show_default=False,
        help="Job whose spec the webhook runs (default: the last run of FED's scheduled "
        "job, else a source job started now).")] = None,
    secret: Annotated[str | None, typer.Option(
        show_default=False, help="Webhook signing secret (default: a random one).")] = None,
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
    """Create (or update) the Hub webhook that runs the server job when a member pushes.

    The job reacts only to client uploads (never to its own personalized/ pushes), and
    triggers that arrive during a round coalesce into one follow-up round. Re-run after
    members join: it updates the webhook in place.

    Examples:

      fedbip-server webhook create acme/fed

      fedbip-server webhook create acme/fed --flavor cpu-upgrade --json
    """
    from fedbip_hub.scheduling import webhooks

    options = _job_options(flavor, timeout, image, python, package, install, namespace)
    hook = webhooks.create_webhook(fed, job_id=job_id, secret=secret, options=options,
                                   token=token, job_token=job_token)
    if json_output:
        print_json({"ok": True, "webhook": hook})
        return
    out_console.print(f"Webhook {hook['id']} {hook['action']}: watches "
                      f"{len(hook['watched'])} member repos; runs job {hook['job_id']} "
                      f"({escape(hook['job_source'])}) with secrets "
                      f"{', '.join(hook['secrets']) or 'none'}.", highlight=False)


@webhook_app.command("list")
@handle_errors
def webhook_list(token: TokenOption = None, json_output: JsonOption = False) -> None:
    """List the webhooks that run a fedbip server job.

    Examples:

      fedbip-server webhook list --json
    """
    from fedbip_hub.scheduling import webhooks

    hooks = webhooks.list_webhooks(token=token)
    if json_output:
        print_json({"ok": True, "webhooks": hooks})
        return
    if not hooks:
        out_console.print("No fedbip webhooks.")
    for hook in hooks:
        names = ", ".join(w["name"] for w in hook["watched"])
        out_console.print(f"{hook['id']} ({hook['federation'] or '?'}"
                          f"{', disabled' if hook['disabled'] else ''}): watches "
                          f"{escape(names)}", highlight=False)


@webhook_app.command("delete")
@handle_errors
def webhook_delete(
    hook_id: Annotated[str, typer.Argument(
        show_default=False, help="Webhook id (from `webhook list`).")],
    token: TokenOption = None, json_output: JsonOption = False) -> None:
    """Delete a webhook.

    Examples:

      fedbip-server webhook delete 6548b2a4f1c1b3e0a2d0c003
    """
    from fedbip_hub.scheduling import webhooks

    result = webhooks.delete_webhook(hook_id, token=token)
    if json_output:
        print_json({"ok": True, **result})
    else:
        out_console.print(f"Deleted webhook {hook_id}.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
