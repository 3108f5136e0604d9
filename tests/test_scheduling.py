"""``fedbip-server schedule``: the HF Jobs spec as sent over real HTTP to the local Hub
(the token only ever in ``secrets``), the manage commands, and the printed templates."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import tomllib
import yaml
from federation_helpers import REPO_ROOT
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from typer.testing import CliRunner

from fedbip_hub import __version__
from fedbip_hub.errors import ConfigError
from fedbip_hub.scheduling.jobs import (
    JOB_ENV,
    TEMPLATES,
    check_schedule,
    cron_expression,
    federation_slug,
    timeout_seconds,
)
from fedbip_hub.testing.hub_server import HubServer
from server_job.main import app

FED = "fedorg/fed"
JOB_TOKEN = "hf_jobBotToken0123456789abcdef"
CPU_COMMAND = ("pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch"
               f" && pip install --quiet fedbip-hub=={__version__}"
               " && exec fedbip-server run fedorg/fed")
LABELS = {"fedbip": "server", "fedbip-federation": "fedorg--fed", "name": "fedbip-fedorg--fed"}


def cli(*args: str, env: dict[str, str] | None = None, code: int = 0):
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr,
                                      result.exception)
    return result


def cli_json(*args: str, env: dict[str, str] | None = None, code: int = 0) -> dict:
    return json.loads(cli(*args, "--json", env=env, code=code).stdout)


def _calls(hub: HubServer, method: str, pattern: str) -> list:
    return [c for c in hub.api_calls if c.method == method and re.fullmatch(pattern, c.path)]


# --------------------------------------------------------------------------- the job spec


def test_the_job_spec_sent_carries_the_token_only_as_a_secret(hub: HubServer) -> None:
    env = {"FEDBIP_JOB_TOKEN": JOB_TOKEN, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "server_job", "schedule", "create", FED,
                           "--every", "@hourly"], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [call] = _calls(hub, "POST", r"/api/scheduled-jobs/fed-admin")
    assert call.body == {
        "jobSpec": {
            "command": ["sh", "-c", CPU_COMMAND],
            "arguments": [],
            "environment": JOB_ENV,
            "flavor": "cpu-basic",
            "secrets": {"HF_TOKEN": JOB_TOKEN},
            "timeoutSeconds": 3600,
            "labels": LABELS,
            "dockerImage": "python:3.12-slim",
        },
        "schedule": "@hourly",
        "concurrency": False,
    }
    spec_without_secrets = {**call.body, "jobSpec": {k: v for k, v in call.body[
        "jobSpec"].items() if k != "secrets"}}
    for token in (JOB_TOKEN, hub.token):
        assert token not in json.dumps(spec_without_secrets)
        assert token not in proc.stdout + proc.stderr
    assert hub.token not in json.dumps(call.body)  # the job token, not the admin's
    assert "Created scheduled job" in proc.stdout and "HF_TOKEN" in proc.stdout
    [stored] = hub.scheduled_jobs.values()
    assert stored["schedule"] == "@hourly" and stored["concurrency"] is False
    # What the Hub answers names the secret, never its value.
    listed = cli_json("schedule", "list")["scheduled_jobs"]
    assert listed[0]["secrets"] == ["HF_TOKEN"]
    assert JOB_TOKEN not in json.dumps(listed)


def test_schedule_options_reach_the_spec(hub: HubServer) -> None:
    job = cli_json("schedule", "create", FED, "--every", "*/30 * * * *", "--flavor", "t4-small",
                   "--timeout", "2h", "--image", "ghcr.io/acme/fedbip:1", "--no-install",
                   "--namespace", "fedorg")["scheduled_job"]
    [call] = _calls(hub, "POST", r"/api/scheduled-jobs/fedorg")
    spec = call.body["jobSpec"]
    assert call.body["schedule"] == "*/30 * * * *"
    assert spec["dockerImage"] == "ghcr.io/acme/fedbip:1"
    assert spec["command"] == ["fedbip-server", "run", FED, "--device", "cuda"]
    assert spec["flavor"] == "t4-small" and spec["timeoutSeconds"] == 7200
    assert spec["secrets"] == {"HF_TOKEN": hub.token}  # default: the caller's token
    assert job["namespace"] == "fedorg" and job["command"] == spec["command"]
    assert job["timeout"] == 7200 and job["federation"] == "fedorg--fed"

    cli_json("schedule", "create", FED, "--every", "@daily", "--package",
             "fedbip-hub[dev]>=0.1")
    [_, call] = _calls(hub, "POST", r"/api/scheduled-jobs/.*")
    assert call.body["jobSpec"]["command"][2].endswith(
        "pip install --quiet 'fedbip-hub[dev]>=0.1' && exec fedbip-server run fedorg/fed")


def test_list_suspend_resume_delete_change_server_state(hub: HubServer) -> None:
    first = cli_json("schedule", "create", FED, "--every", "@hourly")["scheduled_job"]["id"]
    other = cli_json("schedule", "create", "fedorg/other", "--every",
                     "@daily")["scheduled_job"]["id"]
    HfApi().create_scheduled_job(image="ubuntu", command=["true"], schedule="@daily")
    assert {j["id"] for j in cli_json("schedule", "list")["scheduled_jobs"]} == {
        first, other}  # fedbip jobs only
    assert [j["id"] for j in cli_json("schedule", "list", FED)["scheduled_jobs"]] == [first]

    assert cli_json("schedule", "suspend", first)["scheduled_job"]["suspended"] is True
    assert hub.scheduled_jobs[first]["suspend"] is True
    assert hub.scheduled_jobs[other]["suspend"] is False
    assert cli_json("schedule", "inspect", first)["scheduled_job"]["suspended"] is True
    assert "suspended" in cli("schedule", "list", env={"COLUMNS": "200"}).stdout
    assert cli_json("schedule", "resume", first)["scheduled_job"]["suspended"] is False
    assert hub.scheduled_jobs[first]["suspend"] is False

    assert cli_json("schedule", "delete", first) == {
        "ok": True, "scheduled_job": {"id": first, "deleted": True}}
    assert first not in hub.scheduled_jobs and other in hub.scheduled_jobs
    assert [j["id"] for j in cli_json("schedule", "list")["scheduled_jobs"]] == [other]
    paths = [(c.method, c.path) for c in hub.api_calls]
    assert ("POST", f"/api/scheduled-jobs/fed-admin/{first}/suspend") in paths
    assert ("POST", f"/api/scheduled-jobs/fed-admin/{first}/resume") in paths
    assert ("DELETE", f"/api/scheduled-jobs/fed-admin/{first}") in paths


def test_schedule_errors_are_messages_with_hints(hub: HubServer) -> None:
    out = cli_json("schedule", "create", FED, "--every", "0 0 * * * *", code=2)  # six fields
    assert out["error"] == "ConfigError" and "cron" in out["hint"]
    out = cli_json("schedule", "create", "./local-folder", "--every", "@hourly", code=2)
    assert "not a federation on the Hub" in out["message"]
    # noun-verb: a missing verb, an unknown one, or --every on list, are usage errors
    assert cli_json("schedule", FED, code=2)["message"].startswith("No such command")
    assert "Did you mean 'delete'" in cli_json("schedule", "delet", "x", code=2)["message"]
    assert "--every" in cli_json("schedule", "list", FED, "--every", "@daily",
                                 code=2)["message"]
    assert cli_json("schedule", "create", FED, "--every", "@hourly", "--timeout", "soon",
                    code=2)["error"] == "ConfigError"
    assert hub.api_calls == []  # all refused before any request
    out = cli_json("schedule", "create", FED, "--every", "@hourly", "--namespace",
                   "someone-else", code=1)
    assert out["error"] == "AuthError" and "--namespace" in out["hint"]
    out = cli_json("schedule", "suspend", "0123456789abcdef01234567", code=1)
    assert out["error"] == "NotFoundError"
    result = cli("schedule", "delete", "nope", code=1)
    assert "Error:" in result.stderr and hub.token not in result.stderr + result.stdout


def test_schedule_helpers() -> None:
    assert check_schedule("  */5  * * * * ") == "*/5 * * * *"
    assert cron_expression("@hourly") == "0 * * * *"
    assert cron_expression("@weekly") == "0 0 * * 0"
    assert cron_expression("15 3 * * 1-5") == "15 3 * * 1-5"
    for bad in ("@reboot", "hourly", "* * * *", "0 0 * * * *", "0 0 * * ; rm"):
        with pytest.raises(ConfigError):
            check_schedule(bad)
    assert timeout_seconds("90m") == 5400 and timeout_seconds("3600") == 3600
    assert timeout_seconds("1.5h") == 5400
    assert federation_slug("acme/fed.v2") == "acme--fed-v2"


# --------------------------------------------------------------------------- templates


def test_github_workflow_is_valid_yaml_with_cron_and_concurrency(tmp_path) -> None:
    text = cli("schedule", "print", "github", FED, "--every", "@hourly").stdout
    workflow = yaml.safe_load(text)
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads `on` as true
    assert triggers["schedule"] == [{"cron": "0 * * * *"}]
    assert "workflow_dispatch" in triggers
    assert workflow["concurrency"] == {"group": "fedbip-server-fedorg--fed",
                                       "cancel-in-progress": False}
    job = workflow["jobs"]["round"]
    assert job["timeout-minutes"] == 60
    steps = job["steps"]
    assert steps[0]["with"]["python-version"] == "3.12"
    run = steps[-1]
    assert run["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert run["run"].strip() == "fedbip-server run fedorg/fed"
    assert "download.pytorch.org/whl/cpu" in steps[1]["run"]

    custom = yaml.safe_load(cli("schedule", "print", "github", FED, "--every",
                                "*/20 6-18 * * 1-5", "--python", "3.11", "--timeout",
                                "90m").stdout)
    assert custom.get("on", custom.get(True))["schedule"] == [{"cron": "*/20 6-18 * * 1-5"}]
    assert custom["jobs"]["round"]["steps"][0]["with"]["python-version"] == "3.11"
    assert custom["jobs"]["round"]["timeout-minutes"] == 90

    target = tmp_path / "wf" / "fedbip.yml"
    assert cli_json("schedule", "print", "github", FED, "--out", str(target)) == {
        "ok": True, "kind": "github", "path": str(target), "warnings": []}
    assert target.read_text() == text


def test_cron_line_holds_flock_and_the_federation() -> None:
    text = cli("schedule", "print", "cron", FED, "--every", "@daily").stdout
    [line] = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert line.startswith("0 0 * * * flock -n /tmp/fedbip-fedorg--fed.lock ")
    assert f"{sys.executable} -m server_job run fedorg/fed" in line
    assert "HF_TOKEN" not in line and "%" not in line  # cron treats % as a newline
    spaced = cli("schedule", "print", "cron", "/srv/my fed").stdout
    assert "run '/srv/my fed' >>" in spaced


def test_a_local_federation_s_templates_hold_its_absolute_path(tmp_path, monkeypatch) -> None:
    """cron runs from $HOME: a relative ./myfed would name another folder there."""
    (tmp_path / "myfed").mkdir()
    monkeypatch.chdir(tmp_path)
    result = cli("schedule", "print", "cron", "./myfed")
    [line] = [ln for ln in result.stdout.splitlines() if ln and not ln.startswith("#")]
    assert f" run {tmp_path / 'myfed'} >>" in line, line
    assert "./myfed" not in line and "warning" not in result.stderr
    assert cli_json("schedule", "print", "cron", "./myfed")["warnings"] == []


def test_a_github_workflow_for_a_local_folder_warns_it_cannot_reach_it(tmp_path,
                                                                        monkeypatch) -> None:
    (tmp_path / "myfed").mkdir()
    monkeypatch.chdir(tmp_path)
    result = cli("schedule", "print", "github", "./myfed")
    said = " ".join(result.stderr.split())  # the console wraps long lines
    assert "warning:" in said and "GitHub's runner cannot reach it" in said
    assert f"schedule print cron {tmp_path / 'myfed'}" in said  # the fix
    assert f"fedbip-server run {tmp_path / 'myfed'}" in result.stdout
    [warning] = cli_json("schedule", "print", "github", "./myfed")["warnings"]
    assert str(tmp_path / "myfed") in warning
    assert "warning" not in cli("schedule", "print", "github", FED).stderr


def test_docker_and_uv_definitions_run_the_job() -> None:
    docker = cli("schedule", "print", "docker", FED, "--python", "3.11").stdout
    assert docker.splitlines()[-1] == 'CMD ["fedbip-server", "run", "fedorg/fed"]'
    assert "FROM python:3.11-slim" in docker
    assert f"pip install --quiet fedbip-hub=={__version__}" in docker
    assert "HF_TOKEN" not in docker.split("FROM")[1]  # no token baked into the image

    payload = cli_json("schedule", "print", "uv", FED)
    assert payload["filename"] == "fedbip_round.py"
    script = payload["content"]
    ast.parse(script)
    header = re.search(r"(?m)^# /// script$\n((?:^#.*$\n)+?)^# ///$", script)
    assert header is not None
    meta = tomllib.loads("\n".join(line[2:] for line in header[1].splitlines()))
    assert meta["dependencies"] == [f"fedbip-hub=={__version__}"]
    assert meta["tool"]["uv"]["sources"]["torch"] == {"index": "pytorch-cpu"}
    assert meta["tool"]["hf-jobs"]["secrets"] == ["HF_TOKEN"]
    assert 'FEDERATION = "fedorg/fed"' in script
    assert '"fedbip-server", "run", FEDERATION' in script
    for kind in TEMPLATES:
        assert "@@" not in cli("schedule", "print", kind, FED).stdout
    assert cli_json("schedule", "print", "k8s", FED, code=2)["error"] == "ConfigError"


# --------------------------------------------------------------------------- the local Hub


def test_local_hub_scheduled_jobs_api(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    job = api.create_scheduled_job(image="python:3.12", command=["echo", "hi"],
                                   schedule="@hourly", secrets={"HF_TOKEN": "hf_secretvalue1"},
                                   labels={"team": "a"}, namespace="fedorg")
    assert job.owner.name == "fedorg" and job.owner.type == "org"
    assert job.job_spec.secrets == ["HF_TOKEN"]
    assert [j.id for j in api.list_scheduled_jobs(namespace="fedorg",
                                                   labels={"team": "a"})] == [job.id]
    assert api.list_scheduled_jobs(namespace="fedorg", labels={"team": "b"}) == []
    api.suspend_scheduled_job(scheduled_job_id=job.id, namespace="fedorg")
    assert api.inspect_scheduled_job(scheduled_job_id=job.id, namespace="fedorg").suspend
    run = api.trigger_scheduled_job(scheduled_job_id=job.id, namespace="fedorg")
    info = api.inspect_scheduled_job(scheduled_job_id=job.id, namespace="fedorg")
    assert info.status.last_job.id == run.id and run.command == ["echo", "hi"]
    assert "hf_secretvalue1" not in json.dumps([hub.jobs[run.id]["owner"], run.secrets])
    # The value reached the server, which keeps it, but none of its replies echo it.
    assert hub.jobs[run.id]["spec"]["secrets"] == {"HF_TOKEN": "hf_secretvalue1"}
    assert run.secrets == ["HF_TOKEN"]
    assert "hf_secretvalue1" not in repr([job, run, info])
    api.delete_scheduled_job(scheduled_job_id=job.id, namespace="fedorg")
    assert api.list_scheduled_jobs(namespace="fedorg") == []
    with pytest.raises(HfHubHTTPError) as err:
        api.create_scheduled_job(image="x", command=["y"], schedule="@reboot")
    assert err.value.response.status_code == 400
    with pytest.raises(HfHubHTTPError) as err:
        api.list_scheduled_jobs(namespace="not-mine")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token=False).list_scheduled_jobs(namespace="fedorg")
    assert err.value.response.status_code == 401
