"""Options shared by ``fedbip-server``'s schedule and webhook commands (the HF Job's spec)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fedbip_hub.scheduling.jobs import JobOptions

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


def job_options(flavor: str, timeout: str, image: str | None, python: str,
                package: str | None, install: bool, namespace: str | None) -> JobOptions:
    """The HF Job's spec from the shared options."""
    from fedbip_hub.scheduling.jobs import JobOptions

    return JobOptions(flavor=flavor, timeout=timeout, image=image, python=python,
                      package=package, install=install, namespace=namespace)
