"""``fedbip-server``: the scheduled job that runs federation rounds. Thin over the library."""

from __future__ import annotations

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
from server_job.schedule import schedule_app
from server_job.webhook import webhook_app

app = new_app("fedbip-server", "Run FedBip server rounds (from cron, GitHub Actions or HF Jobs).")
# Noun-verb, like `hf jobs scheduled list|delete` (server_job/schedule.py, webhook.py).
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
    from fedbip_hub.scheduling.followups import JobOutcome
    from fedbip_hub.scheduling.webhooks import run_job, webhook_from_env

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
