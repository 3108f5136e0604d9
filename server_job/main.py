"""``fedbip-server``: the scheduled job that runs federation rounds. Thin over the library."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli._common import JsonOption, err_console, handle_errors, out_console, print_json
from fedbip_hub.robust import describe_guards
from fedbip_hub.scheduling import (
    DEFAULT_FLAVOR,
    DEFAULT_PYTHON,
    DEFAULT_SCHEDULE,
    DEFAULT_TIMEOUT,
)

app = typer.Typer(name="fedbip-server", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Run FedBip server rounds (from cron, GitHub Actions or HF Jobs).")


@app.callback()
def _root() -> None:
    """Run FedBip server rounds (from cron, GitHub Actions or HF Jobs)."""


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
    """
    from cli._common import progress
    from fedbip_hub.compute import resolve_device
    from fedbip_hub.errors import RoundInProgressError
    from fedbip_hub.federation import Federation
    from fedbip_hub.webhooks import JobOutcome, run_job, webhook_from_env

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
    "from `--print docker`.")]
NamespaceOption = Annotated[str | None, typer.Option(
    show_default=False, help="HF user or org that owns and pays for the job "
    "(default: the token's user).")]


def _job_options(flavor: str, timeout: str, image: str | None, python: str,
                 package: str | None, install: bool, namespace: str | None):
    from fedbip_hub.scheduling import JobOptions

    return JobOptions(flavor=flavor, timeout=timeout, image=image, python=python,
                      package=package, install=install, namespace=namespace)


@app.command()
@handle_errors
def schedule(
    fed: Annotated[str | None, typer.Argument(
        show_default=False, help="Federation (org/name); optional with --list.")] = None,
    every: Annotated[str | None, typer.Option(
        "--every", show_default=False,
        help='Create the scheduled job: "@hourly", "@daily", ... or a cron expression '
        '("*/30 * * * *", UTC).')] = None,
    list_jobs: Annotated[bool, typer.Option(
        "--list", help="List fedbip scheduled jobs (of FED when given).")] = False,
    inspect: Annotated[str | None, typer.Option(
        "--inspect", metavar="ID", show_default=False, help="Show one scheduled job.")] = None,
    suspend: Annotated[str | None, typer.Option(
        "--suspend", metavar="ID", show_default=False, help="Pause a scheduled job.")] = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", metavar="ID", show_default=False, help="Resume a paused job.")] = None,
    delete: Annotated[str | None, typer.Option(
        "--delete", metavar="ID", show_default=False, help="Delete a scheduled job.")] = None,
    print_kind: Annotated[str | None, typer.Option(
        "--print", metavar="github|cron|docker|uv", show_default=False,
        help="Write a GitHub Actions workflow, a crontab line, a Dockerfile or a uv script "
        "for FED (schedule from --every, default @hourly).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", show_default=False, help="With --print: write to this file.")] = None,
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
    """Run FED's rounds on a schedule: create and manage the HF Jobs scheduled job, or print
    a GitHub Actions / cron / Docker / uv definition.

    The job runs `fedbip-server run FED` with the token as its HF_TOKEN secret, never in
    its command or environment, and never two runs at once.
    """
    from fedbip_hub import scheduling
    from fedbip_hub.errors import ConfigError

    manage = {"suspend": suspend, "resume": resume, "delete": delete}
    chosen = [name for name, on in [("--print", print_kind is not None), ("--list", list_jobs),
                                    ("--inspect", inspect is not None),
                                    *[(f"--{k}", v is not None) for k, v in manage.items()]]
              if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} cannot be combined.",
                          hint="Run one action at a time.")
    if every is not None and chosen and chosen != ["--print"]:
        raise ConfigError(f"--every does not go with {chosen[0]}.",
                          hint="--every creates a job (or fills in --print).")
    if not chosen and every is None:
        raise ConfigError("nothing to do.", hint='Pass --every "@hourly" (or a cron '
                          "expression) to create the job, or --list, --inspect ID, "
                          "--suspend ID, --resume ID, --delete ID, --print KIND.")
    options = _job_options(flavor, timeout, image, python, package, install, namespace)
    if print_kind is not None:
        _print_template(_need_fed(fed, "--print"), print_kind, every or DEFAULT_SCHEDULE, options,
                        out, json_output)
        return
    if list_jobs:
        jobs = scheduling.list_schedules(fed, namespace=namespace, token=token)
        if json_output:
            print_json({"ok": True, "scheduled_jobs": jobs})
        else:
            _print_schedules(jobs)
        return
    if inspect is not None:
        job = scheduling.inspect_schedule(inspect, namespace=namespace, token=token)
        _print_schedule_result(job, "", json_output)
        return
    for action, job_id in manage.items():
        if job_id is not None:
            job = scheduling.manage_schedule(action, job_id, namespace=namespace, token=token)
            _print_schedule_result(job, {"suspend": "Suspended", "resume": "Resumed",
                                         "delete": "Deleted"}[action], json_output)
            return
    job = scheduling.create_schedule(_need_fed(fed, "--every"), every, options, token=token,
                                     job_token=job_token)
    _print_schedule_result(job, "Created", json_output)
    if not json_output:
        err_console.print(f"Watch it with `hf jobs scheduled inspect {job['id']}` and each "
                          "run with `hf jobs logs <job id>`.", highlight=False)


def _need_fed(fed: str | None, flag: str) -> str:
    from fedbip_hub.errors import ConfigError

    if not fed:
        raise ConfigError(f"{flag} needs the federation.",
                          hint=f"fedbip-server schedule org/name {flag} ...")
    return fed


def _print_template(fed: str, kind: str, every: str, options, out: Path | None,
                    json_output: bool) -> None:
    from importlib.resources import files

    from fedbip_hub import scheduling
    from fedbip_hub.errors import ConfigError

    if kind not in scheduling.TEMPLATES:
        raise ConfigError(f"unknown --print {kind!r}.",
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


@app.command()
@handle_errors
def webhook(
    fed: Annotated[str | None, typer.Argument(
        show_default=False, help="Federation (org/name) whose member repos to watch.")] = None,
    job_id: Annotated[str | None, typer.Option(
        "--job-id", show_default=False,
        help="Job whose spec the webhook runs (default: the last run of FED's scheduled "
        "job, else a source job started now).")] = None,
    secret: Annotated[str | None, typer.Option(
        show_default=False, help="Webhook signing secret (default: a random one).")] = None,
    list_hooks: Annotated[bool, typer.Option(
        "--list", help="List the webhooks that run a fedbip server job.")] = False,
    delete: Annotated[str | None, typer.Option(
        "--delete", metavar="ID", show_default=False, help="Delete a webhook.")] = None,
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
    """Run the server job when a member pushes: a Hub webhook on every member repo.

    The job reacts only to client uploads (never to its own personalized/ pushes), and
    triggers that arrive during a round coalesce into one follow-up round. Re-run after
    members join: it updates the webhook in place.
    """
    from fedbip_hub import webhooks
    from fedbip_hub.errors import ConfigError

    if list_hooks and delete is not None:
        raise ConfigError("--list and --delete cannot be combined.")
    if list_hooks:
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
        return
    if delete is not None:
        result = webhooks.delete_webhook(delete, token=token)
        if json_output:
            print_json({"ok": True, **result})
        else:
            out_console.print(f"Deleted webhook {delete}.")
        return
    options = _job_options(flavor, timeout, image, python, package, install, namespace)
    hook = webhooks.create_webhook(_need_fed(fed, "webhook"), job_id=job_id, secret=secret,
                                   options=options, token=token, job_token=job_token)
    if json_output:
        print_json({"ok": True, "webhook": hook})
        return
    out_console.print(f"Webhook {hook['id']} {hook['action']}: watches "
                      f"{len(hook['watched'])} member repos; runs job {hook['job_id']} "
                      f"({escape(hook['job_source'])}) with secrets "
                      f"{', '.join(hook['secrets']) or 'none'}.", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
