"""Every command of both CLIs, given bad arguments: one ``Error:`` line with a ``Hint:``
(or one JSON error object under --json), no traceback, and the project's exit codes
(2: a usage or config error the user fixes on the command line; 1: a runtime error).

The commands are found from the apps themselves, so a new command is covered without
editing this file. Runs in-process (typer's CliRunner): the same code the console
scripts run, with stdout and stderr kept apart.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from cli_commands import command_paths, is_number, options_of
from federation_helpers import new_local_federation
from typer.testing import CliRunner

from cli.main import app as fedbip_app
from server_job.main import app as server_app

APPS = {"fedbip": fedbip_app, "fedbip-server": server_app}
COMMANDS = [(prog, path, command) for prog, app in APPS.items()
            for path, command in command_paths(app).items()]
IDS = [f"{prog} {path}" for prog, path, _ in COMMANDS]
# What a temp folder made by tempfile looks like (the staging copy push validates).
TEMP_NAME = re.compile(re.escape(tempfile.gettempdir()) + r"/tmp[a-z0-9_]{6,}")


def invoke(prog: str, args: list[str], *, json_output: bool = False):
    extra = ["--json"] if json_output else []
    return CliRunner().invoke(APPS[prog], [*args, *extra], env={"COLUMNS": "100"})


def check_error(result, code: int, *, json_output: bool, names: str | None = None) -> str:
    """The one error the command printed (message and hint), checked for form."""
    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err, err
    assert result.exit_code == code, (result.exit_code, out, err, result.exception)
    if json_output:
        payload = json.loads(out)
        assert payload["ok"] is False and payload["error"] != "UnexpectedError", payload
        assert payload["message"] and payload["hint"], payload
        text = f"{payload['message']} {payload['hint']}"
    else:
        assert out == ""
        lines = [line for line in err.splitlines() if line.strip()]
        assert [line.split(":")[0] for line in lines] == ["Error", "Hint"], err
        assert not lines[0].startswith("Error: unexpected"), err
        text = " ".join(lines)
    assert not TEMP_NAME.search(text), text  # what the user gave, never a staging folder
    if names is not None:
        assert names in text, text
    return text


def _has_json(command) -> bool:
    return "--json" in options_of(command)


def _modes(command) -> list[bool]:
    return [False, True] if _has_json(command) else [False]


# ------------------------------------------------------------------- every command, generic
@pytest.mark.parametrize(("prog", "path", "command"), COMMANDS, ids=IDS)
def test_missing_arguments_are_usage_errors(prog, path, command):
    required = [p for p in command.params if p.required]
    if not required:
        pytest.skip("no required argument")
    for json_output in _modes(command):
        result = invoke(prog, path.split(), json_output=json_output)
        text = check_error(result, 2, json_output=json_output)
        assert "Missing" in text


@pytest.mark.parametrize(("prog", "path", "command"), COMMANDS, ids=IDS)
def test_option_typos_get_did_you_mean(prog, path, command):
    option = "--json" if _has_json(command) else sorted(options_of(command) - {"--help"})[0]
    typo = option[:-1]  # --jso
    for json_output in _modes(command):
        result = invoke(prog, [*path.split(), typo], json_output=json_output)
        text = check_error(result, 2, json_output=json_output)
        assert f"Did you mean {option}" in text, text


def _placeholders(command, tmp_path: Path, skip: str) -> list[str]:
    """Values for the required parameters, so that only the bad one is wrong."""
    args = []
    for param in command.params:
        if not param.required or param.name == skip:
            continue
        value = "0" if is_number(param) else str(tmp_path)
        args += [param.opts[0], value] if param.param_type_name == "option" else [value]
    return args


TYPED = [(prog, path, command, param.name) for prog, path, command in COMMANDS
         for param in command.params
         if param.param_type_name == "option" and is_number(param)]


@pytest.mark.parametrize(("prog", "path", "command", "name"), TYPED,
                         ids=[f"{p} {c} {n}" for p, c, _, n in TYPED])
def test_numbers_that_are_not_numbers_are_usage_errors(prog, path, command, name, tmp_path):
    [param] = [p for p in command.params if p.name == name]
    args = [*path.split(), *_placeholders(command, tmp_path, name), param.opts[0], "lots"]
    for json_output in _modes(command):
        check_error(invoke(prog, args, json_output=json_output), 2, json_output=json_output,
                    names=param.opts[0])


def test_every_command_is_walked():
    paths = {f"{prog} {path}" for prog, path, _ in COMMANDS}
    assert {"fedbip push", "fedbip train", "fedbip-server run", "fedbip-server schedule create",
            "fedbip-server webhook delete"} <= paths
    assert len(TYPED) >= 10


# ------------------------------------------------------------- paths, files and their contents
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    """A local federation whose base model is then broken: any command that loaded the
    model before checking its data would fail on the model, not the data."""
    root = tmp_path_factory.mktemp("bad-args")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    fed = new_local_federation(root, base, push_all=False)
    for weights in base.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    files = {
        "empty.jsonl": "",
        "bad-line.jsonl": '{"input_ids": [1, 2], "label": 0}\n{"input_ids": [3], "label": 1}\n'
                          '{"input_ids": [4, "label": 1}\n',
        "bad-label.jsonl": '{"input_ids": [1, 2], "label": 0}\n{"input_ids": [3], "label": 7}\n',
        "no-label.jsonl": '{"input_ids": [1, 2]}\n',
        "good.jsonl": '{"input_ids": [1, 2], "label": 0}\n{"input_ids": [3], "label": 1}\n',
        "notes.txt": "hello\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "empty-dir").mkdir()
    return {"root": root, "fed": str(fed.address)}


def _cases(w: dict) -> list[tuple[str, list[str], int, str | None]]:
    root, fed = w["root"], w["fed"]
    member = [fed, "--client", "alice"]
    return [
        # push: a missing folder, a file, a folder without an adapter
        ("fedbip", ["push", *member, "--adapter", f"{root}/nope"], 2, f"{root}/nope"),
        ("fedbip", ["push", *member, "--adapter", f"{root}/good.jsonl"], 2, "good.jsonl"),
        ("fedbip", ["push", *member, "--adapter", f"{root}/empty-dir"], 1, "empty-dir"),
        ("fedbip", ["pull", *member, "--out", f"{root}/notes.txt"], 2, "notes.txt"),
        # train and eval: the data is checked before the (broken) model loads
        ("fedbip", ["train", *member, "--data", f"{root}/nope.jsonl"], 2, "nope.jsonl"),
        ("fedbip", ["train", *member, "--data", f"{root}/empty.jsonl"], 2, "is empty"),
        ("fedbip", ["train", *member, "--data", f"{root}/bad-line.jsonl"], 2, "line 3"),
        ("fedbip", ["train", *member, "--data", f"{root}/bad-label.jsonl"], 2, "label 7"),
        ("fedbip", ["train", *member, "--data", f"{root}/no-label.jsonl"], 2, "'label'"),
        ("fedbip", ["train", *member, "--data", f"{root}/notes.txt"], 2, ".txt"),
        ("fedbip", ["train", *member, "--data", f"{root}/empty-dir"], 2, "empty-dir"),
        ("fedbip", ["eval", *member, "--data", f"{root}/bad-label.jsonl"], 2, "label 7"),
        ("fedbip", ["eval", *member, "--data", f"{root}/bad-line.jsonl"], 2, "line 3"),
        ("fedbip", ["eval", *member, "--data", f"{root}/good.jsonl", "--adapter",
                    f"{root}/notes.txt"], 2, "notes.txt"),
        # init: options, strategy options with near matches, a base model path
        ("fedbip", ["init", f"{root}/new", "--base-model", f"{root}/base",
                    "--strategy-options", '{"rule": "zscor"}'], 2, "Did you mean 'zscore'"),
        ("fedbip", ["init", f"{root}/new", "--base-model", f"{root}/base",
                    "--strategy-options", '{"rul": "zscore"}'], 2, "Did you mean 'rule'"),
        ("fedbip", ["init", f"{root}/new", "--base-model", f"{root}/base",
                    "--strategy", "fedbp"], 2, "Did you mean 'fedbip'"),
        ("fedbip", ["init", f"{root}/new", "--base-model", f"{root}/base",
                    "--strategy-options", "{rule: zscore}"], 2, "not JSON"),
        ("fedbip", ["init", f"{root}/new", "--base-model", "./no-such-base"], 2,
         "no-such-base"),
        ("fedbip", ["init", f"{root}/new", "--base-model", f"{root}/base", "--task", "clf"],
         2, "clf"),
        ("fedbip", ["init", f"{root}/new", "--base-model", f"{root}/base", "--task",
                    "seq_cls"], 2, "Did you mean 'seq-cls'"),
        ("fedbip", ["similarity", f"{root}/nope", "--granularity", "layers"], 2,
         "Did you mean 'layer'"),
        # the engine on folders
        ("fedbip", ["similarity", f"{root}/nope", f"{root}/empty-dir"], 1, f"{root}/nope"),
        ("fedbip", ["similarity", f"{root}/good.jsonl", f"{root}/empty-dir"], 1,
         "good.jsonl"),
        ("fedbip", ["merge", f"{root}/nope", f"{root}/empty-dir", "--for", "0", "--out",
                    f"{root}/notes.txt"], 2, "notes.txt"),
        # a federation that is not there, read as a folder: the hint names the Hub reading
        ("fedbip", ["status", f"{root}/nope"], 1, "for a Hub repo"),
        ("fedbip", ["status", f"{root}/notes.txt"], 1, "notes.txt"),
        ("fedbip", ["join", f"{root}/nope", "--client", "zed"], 1, "nope"),
        ("fedbip", ["demo", "--dir", f"{root}/notes.txt"], 2, "notes.txt"),
        ("fedbip-server", ["run", f"{root}/nope"], 1, "nope"),
        ("fedbip-server", ["run", fed, "--device", "tpu"], 2, "tpu"),
        ("fedbip-server", ["schedule", "print", "gihub", "acme/fed"], 2,
         "Did you mean 'github'"),
        ("fedbip-server", ["schedule", "print", "cron", "acme/fed", "--out", str(root)], 2,
         str(root)),
        ("fedbip-server", ["schedule", "create", "acme/fed", "--every", "hourly"], 2,
         "hourly"),
        ("fedbip-server", ["schedule", "lst"], 2, "Did you mean 'list'"),
    ]


def test_bad_paths_and_files_give_one_clear_error(world):
    failures = []
    for prog, args, code, names in _cases(world):
        for json_output in (False, True):
            result = invoke(prog, args, json_output=json_output)
            try:
                check_error(result, code, json_output=json_output, names=names)
            except AssertionError as exc:
                failures.append(f"{prog} {' '.join(args)} (json={json_output}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_a_relative_hub_looking_address_hints_at_the_folder_reading(hub, tmp_path,
                                                                      monkeypatch):
    """`work/fed` that is no folder here is read as a Hub id; the hint offers ./work/fed."""
    monkeypatch.chdir(tmp_path)
    for json_output in (False, True):
        text = check_error(invoke("fedbip", ["status", "work/fed"], json_output=json_output),
                           1, json_output=json_output)
        assert "./work/fed" in text and "Hub repo id" in text
    (tmp_path / "work" / "fed").mkdir(parents=True)  # now a folder: read as one, offline
    text = check_error(invoke("fedbip", ["status", "work/fed"]), 1, json_output=False)
    assert "local folder" in text
    assert not [c for c in hub.api_calls if "work" in c.path]


def test_the_data_checks_run_before_the_model_would_load(world):
    """The control: good data reaches the model, which is broken, and fails there."""
    result = invoke("fedbip", ["train", world["fed"], "--client", "alice", "--data",
                               f"{world['root']}/good.jsonl", "--device", "cpu"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "good.jsonl" not in error and "label" not in error  # not a data error


@pytest.mark.parametrize(("prog", "path", "command"), COMMANDS, ids=IDS)
def test_every_command_takes_h_and_shows_examples(prog, path, command):
    result = CliRunner().invoke(APPS[prog], [*path.split(), "-h"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "Examples" in result.stdout
    examples = [line.strip(" │") for line in result.stdout.splitlines()
                if line.strip(" │").startswith(prog + " ")]
    assert any(line.startswith(f"{prog} {path}") for line in examples), result.stdout


def test_the_old_rank_option_name_still_works(tmp_path, tiny_base):
    """`init --r` (the old name, hidden from the help) and `--rank` record the same rank."""
    for flag in ("--rank", "--r"):
        result = invoke("fedbip", ["init", str(tmp_path / flag.strip("-")), "--base-model",
                                   str(tiny_base), "--num-labels", "3", flag, "3"],
                        json_output=True)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["config"]["lora"]["r"] == 3
    assert "--r " not in CliRunner().invoke(fedbip_app, ["init", "-h"]).stdout
