"""``fedbip init|join|push|pull|status|strategy``: the member's side of a federation
(and the coordinator's strategy changes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli._common import JsonOption, handle_errors, matrix_table, out_console, print_json

FedArg = Annotated[str, typer.Argument(
    help="Federation: org/name on the Hub, or a local folder (an existing folder, or a path "
    "spelled with ./, / or ~).")]
ClientOption = Annotated[str, typer.Option(
    "--client", envvar="FEDBIP_CLIENT", help="Your member name (env FEDBIP_CLIENT).")]
TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="HF_TOKEN", show_envvar=True, show_default=False,
    help="Hub token (default: HF_TOKEN or `hf auth login`).")]


def _fed(address: str, token: str | None):
    from fedbip_hub.federation.repo import Federation

    return Federation.at(address, token=token)


@handle_errors
def init(
    fed: FedArg,
    base_model: Annotated[str, typer.Option(help="Base model id or local path.")],
    base_revision: Annotated[str | None, typer.Option(help="Pin the base model revision.")
                             ] = None,
    task: Annotated[str, typer.Option(help="seq-cls or causal-lm.")] = "seq-cls",
    num_labels: Annotated[int, typer.Option(help="Labels (seq-cls).")] = 2,
    r: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 8,
    old_r: Annotated[int | None, typer.Option("--r", hidden=True)] = None,  # the old name
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 16.0,
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names.")
                              ] = "q_proj,v_proj",
    rslora: Annotated[bool, typer.Option(help="Use rsLoRA scaling.")] = False,
    lora_dropout: Annotated[float, typer.Option(
        help="Dropout on the LoRA path during training, in [0, 1) (recorded in the initial "
        "adapter's config, which every member trains from).")] = 0.05,
    strategy: Annotated[str, typer.Option(help="Merge method (fedbip-l, fedbip, ...).")
                        ] = "fedbip-l",
    strategy_options: Annotated[str | None, typer.Option(
        help='Strategy options as JSON, e.g. \'{"rule": "zscore", "self_share": 0.5}\'; '
        'the oracle needs \'{"groups": {"alice": "g1", ...}}\'.')] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial adapter.")] = 0,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a federation: config, initial adapter and dashboard in one private repo.

    Examples:

      fedbip init acme/fed --base-model HuggingFaceTB/SmolLM2-135M --num-labels 2

      fedbip init ./myfed --base-model ./tiny-base --rank 4 --strategy fedbip
    """
    from pydantic import ValidationError
    from rich.markup import escape

    from cli._common import err_console
    from fedbip_hub.engine.strategies import Strategy
    from fedbip_hub.errors import ConfigError, did_you_mean
    from fedbip_hub.federation.client import init_federation, local_base_warning
    from fedbip_hub.federation.config import FederationConfig, LoraSpec

    r = old_r if old_r is not None else r
    task_types = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
    if task not in task_types:
        raise ConfigError(f"unknown task {task!r}.{did_you_mean(task, task_types)}",
                          hint="Use seq-cls or causal-lm.")
    try:
        options = json.loads(strategy_options) if strategy_options else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--strategy-options is not JSON ({exc}).",
                          hint='Pass e.g. \'{"rule": "zscore"}\'.') from exc
    chosen = Strategy.parse(strategy, **options)
    try:
        lora = LoraSpec(r=r, alpha=alpha, use_rslora=rslora, dropout=lora_dropout,
                        target_modules=[t.strip() for t in target_modules.split(",") if t])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"invalid LoRA options ({problems}).",
                          hint="--rank and --alpha must be positive, --lora-dropout in [0, 1)."
                          ) from exc
    config = FederationConfig(
        name=fed.rstrip("/").split("/")[-1],
        base_model=base_model, base_revision=base_revision, task_type=task_types[task],
        num_labels=num_labels if task == "seq-cls" else None,
        lora=lora,
        strategy=chosen.model_dump(mode="json", exclude_defaults=True) | {
            "method": chosen.method},
        seed=seed)
    federation = init_federation(fed, config, token=token)
    warning = local_base_warning(federation, config)
    if json_output:
        print_json({"ok": True, "federation": fed, "store": federation.store.describe(),
                    "config": config.model_dump(mode="json"),
                    "warnings": [warning] if warning else []})
        return
    if warning:
        err_console.print(f"[yellow]Warning:[/] {escape(warning)}", highlight=False)
    out_console.print(f"Created federation [bold]{config.name}[/] on "
                      f"{federation.store.describe()} ({chosen.method}).")
    out_console.print(f"Next: members run `fedbip join {fed} --client NAME`.")


@handle_errors
def join(fed: FedArg, client: ClientOption,
         repo: Annotated[str | None, typer.Option(help="Your repo (default: derived).")] = None,
         token: TokenOption = None, json_output: JsonOption = False) -> None:
    """Join a federation: create your private repo and record your membership.

    Examples:

      fedbip join acme/fed --client alice

      FEDBIP_CLIENT=alice fedbip join ./myfed
    """
    from fedbip_hub.federation.client import join as join_federation

    member = join_federation(_fed(fed, token), client, repo_id=repo)
    if json_output:
        print_json({"ok": True, **member.model_dump(mode="json")})
        return
    out_console.print(f"{client} is a member of {fed}; your repo is {member.repo_id}.")


@handle_errors
def push(fed: FedArg, client: ClientOption,
         adapter: Annotated[Path, typer.Option(
             exists=True, file_okay=False, show_default=False,
             help="Adapter folder to upload (adapter_config.json and "
             "adapter_model.safetensors, as PEFT's save_pretrained writes).")],
         n_examples: Annotated[int | None, typer.Option(help="Training examples used.")] = None,
         start_revision: Annotated[str | None, typer.Option(
             help="Personalized revision you trained from (default: recorded by pull).")
                                   ] = None,
         token: TokenOption = None, json_output: JsonOption = False) -> None:
    """Validate your adapter against the federation, then upload it in one commit.

    Examples:

      fedbip push acme/fed --client alice --adapter fedbip-adapter-alice

      fedbip push ./myfed --client alice --adapter ./my-trainer-output --n-examples 800
    """
    from fedbip_hub.federation.client import push as push_upload

    result = push_upload(_fed(fed, token), client, adapter, n_examples=n_examples,
                         start_revision=start_revision)
    if json_output:
        print_json({"ok": True, "client": client, "repo_id": result.repo_id,
                    "commit": result.commit, "removed": result.removed,
                    "metadata": result.metadata.model_dump(mode="json")})
        return
    out_console.print(f"Pushed {adapter} to {result.repo_id} @ {result.commit[:12]} "
                      f"(start {(result.metadata.start_revision or 'init')[:12]}).")
    if result.removed:
        out_console.print(f"Removed stale files from the repo root: {', '.join(result.removed)}.")


@handle_errors
def pull(fed: FedArg, client: ClientOption,
         out: Annotated[Path, typer.Option(
             file_okay=False, help="Folder to write the adapter to.")] = Path("personalized"),
         or_init: Annotated[bool, typer.Option(
             "--or-init", help="Before your first round, write the federation's initial "
             "adapter instead (what your own trainer starts from).")] = False,
         token: TokenOption = None, json_output: JsonOption = False) -> None:
    """Fetch your latest personalized adapter (PEFT-loadable) and note its revision.

    Examples:

      fedbip pull acme/fed --client alice --out personalized

      fedbip pull ./myfed --client alice --json
    """
    from fedbip_hub.federation.client import pull as pull_adapter

    result = pull_adapter(_fed(fed, token), client, out, or_init=or_init)
    if json_output:
        print_json({"ok": True, "client": client, "revision": result.revision,
                    "folder": str(result.folder)})
        return
    if result.revision is None:
        out_console.print(f"No round has personalized {client} yet: the initial adapter "
                          f"was written to {out}.")
        return
    out_console.print(f"Personalized adapter @ {result.revision[:12]} written to {out}.")


@handle_errors
def status(fed: FedArg, token: TokenOption = None, json_output: JsonOption = False) -> None:
    """Members, last uploads, staleness, the last round and a similarity summary.

    Examples:

      fedbip status acme/fed

      fedbip status ./myfed --json
    """

    from fedbip_hub.federation.status import federation_status

    report = federation_status(_fed(fed, token))
    if json_output:
        print_json(report)
        return
    config = report["config"]
    out_console.print(f"[bold]{config['name']}[/] on {report['store']} — base "
                      f"{config['base_model']}, round {report['round']}"
                      f"{' (a round is in progress)' if report['round_in_progress'] else ''}")
    out_console.print(status_table(report))
    for path, why in (report.get("member_problems") or {}).items():
        out_console.print(f"[yellow]left out[/] {path}: {why}", markup=True, highlight=False)
    from rich.markup import escape

    last = report["last_round"]
    if last and last.get("settings_changed"):
        replayed = (f", replaying round {last['replay_of']}'s updates"
                    if last.get("replay_of") else "")
        out_console.print(f"round {last['round']} re-merged every member "
                          f"({escape(last['settings_changed'])}){replayed}", highlight=False)
    if report.get("settings_pending"):
        out_console.print(f"[yellow]{escape(report['settings_pending'])}[/] since round "
                          f"{report['round']}: the next round re-merges every member",
                          highlight=False)
    if last and last.get("model_cosine"):
        out_console.print(matrix_table(f"round {last['round']}: model-level cosine",
                                       last["clients"], last["model_cosine"]))


def status_table(report: dict):
    """Members at a glance, within 100 columns: the reason a member's upload is refused,
    or what the last round's guards did to it, wraps in the last column (never cut)."""
    from rich.markup import escape
    from rich.table import Table

    guards = (report.get("last_round") or {}).get("guards") or {}
    table = Table(title_justify="left", pad_edge=False)
    table.add_column("member", overflow="fold", max_width=16)
    table.add_column("uploaded (UTC)", no_wrap=True)
    for name in ("upload", "versions", "stale"):
        table.add_column(name, justify="left" if name == "upload" else "right", no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    for m in report["members"]:
        upload = m.get("last_upload") or {}
        state = ("[yellow]refused[/]" if m.get("refused") else
                 "pending" if m.get("pending") else "consumed" if upload else "none")
        why = (f"[yellow]{escape(m['refusal'])}[/]" if m.get("refusal") else
               escape(guards.get(m["name"], "")) or escape(m.get("error") or ""))
        table.add_row(escape(m["name"]), _short_time(upload.get("uploaded_at")), state,
                      str(m["personalized_versions"]), str(m.get("staleness", "–")), why)
    return table


def _short_time(stamp: str | None) -> str:
    """2026-12-01T11:32:02+00:00 → 2026-12-01 11:32 (UTC, as recorded)."""
    if not stamp:
        return "–"
    return stamp.replace("T", " ")[:16]


@handle_errors
def strategy(
    fed: FedArg,
    options: Annotated[list[str], typer.Argument(
        help="Strategy options as key=value (values as JSON, else text; null: back to "
        "the default), e.g. rank=16 rule=zscore self_share=0.5.", show_default=False)],
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change the federation's strategy (its coordinator): one commit of federation.json.

    The next round sees the merge settings changed and re-merges every member under
    them, uploads or not.

    Examples:

      fedbip strategy acme/fed rank=16

      fedbip strategy ./myfed rule=zscore self_share=0.5

      fedbip strategy ./myfed top_k=null --json
    """
    from rich.markup import escape

    from fedbip_hub.federation.reconfigure import parse_options, set_strategy_options
    from fedbip_hub.federation.settings import describe_changes

    update = set_strategy_options(_fed(fed, token), parse_options(options))
    if json_output:
        print_json({"ok": True, "strategy": update.strategy, "commit": update.commit,
                    "settings_changed": update.changes})
        return
    if update.commit is None:
        out_console.print("The strategy already has these options: nothing committed.")
        return
    what = (f"{escape(describe_changes(update.changes))}; the next round re-merges every "
            "member" if update.changes else "no merge setting changed")
    out_console.print(f"Strategy updated @ {update.commit[:12]} ({what}).", highlight=False)


def register_federation_commands(app: typer.Typer) -> None:
    for command in (init, join, push, pull, status, strategy):
        app.command()(command)


