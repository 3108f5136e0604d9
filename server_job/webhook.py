"""``fedbip-server webhook ...``: the Hub webhook that runs the server job when a member
pushes. Thin over ``fedbip_hub.scheduling.webhook_setup``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from cli._common import JsonOption, handle_errors, new_app, out_console, print_json
from fedbip_hub.scheduling.jobs import DEFAULT_FLAVOR, DEFAULT_PYTHON, DEFAULT_TIMEOUT
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

webhook_app = new_app(
    "webhook", "Run the server job when a member pushes: a Hub webhook on every member repo "
    "(create, list, delete).")


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
    from fedbip_hub.scheduling import webhook_setup

    options = job_options(flavor, timeout, image, python, package, install, namespace)
    hook = webhook_setup.create_webhook(fed, job_id=job_id, secret=secret, options=options,
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
    from fedbip_hub.scheduling import webhook_setup

    hooks = webhook_setup.list_webhooks(token=token)
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
    from fedbip_hub.scheduling import webhook_setup

    result = webhook_setup.delete_webhook(hook_id, token=token)
    if json_output:
        print_json({"ok": True, **result})
    else:
        out_console.print(f"Deleted webhook {hook_id}.")
