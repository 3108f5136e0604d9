"""``fedbip-server``: the scheduled job that runs federation rounds. Thin over the library."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._common import JsonOption, err_console, handle_errors, out_console, print_json

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
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    token: Annotated[str | None, typer.Option(envvar="HF_TOKEN", show_default=False,
                                              help="Hub token (default: HF_TOKEN).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Run one asynchronous round: consume new uploads, personalize every member."""
    from cli._common import progress
    from fedbip_hub.federation import Federation
    from fedbip_hub.rounds import run_round

    def step_progress(items, description):
        wrap = progress(description, enabled=not json_output)
        return wrap(items) if wrap else items

    fed_obj = Federation.at(fed, token=token)
    record = run_round(fed_obj, dry_run=dry_run, takeover=takeover, device=device,
                       progress=step_progress,
                       log=(lambda msg: None) if json_output else err_console.print)
    if json_output:
        print_json({"ok": True, **record})
        return
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
    for name, reason in (record.get("skipped") or {}).items():
        out_console.print(f"  [yellow]skipped[/] {name}: {reason}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
