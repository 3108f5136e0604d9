"""``fedbip similarity`` and ``fedbip merge``.

The entry point runs as real subprocesses (all launched at once, in a module fixture, since
each pays the torch/PEFT import); the six merge strategies also run through the same typer
app in-process (typer's CliRunner), which checks the same code at a fraction of the cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import PREFIX, brute_cosine, peft_reference, write_raw_adapter
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
HEAD = "lm_head.weight"
LORA = [Q0, V0, Q1, V1]
LAYERS = {"model.layers.0": [Q0, V0], "model.layers.1": [Q1, V1], "lm_head": [HEAD]}
LAYER_OF = {m: layer for layer, modules in LAYERS.items() for m in modules}
METHODS = ["fedbip", "fedbip-l", "fedavg", "fedit", "uniform", "local"]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *map(str, args)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1", PYTHONPATH=str(ROOT))
    env.pop("FEDBIP_DEBUG", None)
    return env


def run_many(commands: dict[str, list], timeout: float = 300
             ) -> dict[str, subprocess.CompletedProcess]:
    """Run CLI invocations concurrently; name → finished process."""
    procs = {name: subprocess.Popen(_command(*args), cwd=ROOT, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        results[name] = subprocess.CompletedProcess(commands[name], proc.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Mixed-rank adapters (with a dense head) and equal-rank ones (for fedit)."""
    root = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(8)
    common = torch.randn(64, 32, generator=gen)
    specs = [dict(r=2, lora_alpha=4), dict(r=3, lora_alpha=6, use_rslora=True),
             dict(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.v_proj": 1})]
    mixed = [write_raw_adapter(root / name, seed=30 + k, **spec,
                               dense={HEAD: common + torch.randn(64, 32, generator=gen)})
             for k, (name, spec) in enumerate(zip(["alpha", "beta", "gamma"], specs,
                                                  strict=True))]
    equal = [write_raw_adapter(root / f"eq{k}", r=3, lora_alpha=3 + k, seed=50 + k)
             for k in range(3)]
    return {"mixed": mixed, "mixed_refs": [peft_reference(f) for f in mixed],
            "equal": equal, "equal_refs": [peft_reference(f) for f in equal], "root": root}


def _flat(ref, modules):
    items = {**ref.deltas, **ref.dense}
    return torch.cat([items[m].reshape(-1) for m in modules])


def _as_tensor(matrix):
    return torch.tensor(matrix, dtype=torch.float64)


ORDER = [2, 0, 1]


@pytest.fixture(scope="module")
def runs(adapters):
    """Every subprocess of this module, started together."""
    mixed, root = adapters["mixed"], adapters["root"]
    missing = root / "no-such-adapter"
    return run_many({
        "similarity": ["similarity", *mixed, "--json", "--plot", root / "heat" / "sim.png",
                       "--granularity", "layer"],
        "swapped": ["similarity", *[mixed[i] for i in ORDER], "--json"],
        "merge": ["merge", *mixed, "--for", 2, "--strategy", "fedbip-l", "--rank", 9,
                  "--out", root / "merged", "--json"],
        "missing": ["similarity", mixed[0], missing],
        "missing_json": ["merge", missing, mixed[0], "--for", 0, "--out", root / "o1",
                         "--json"],
    })


def test_similarity_json_and_plot(adapters, runs):
    refs = adapters["mixed_refs"]
    forward, swapped = runs["similarity"], runs["swapped"]
    assert forward.returncode == 0, forward.stderr
    assert swapped.returncode == 0, swapped.stderr
    payload, other = json.loads(forward.stdout), json.loads(swapped.stdout)

    assert payload["clients"] == ["alpha", "beta", "gamma"]
    every = [m for modules in LAYERS.values() for m in modules]
    expected = brute_cosine([_flat(r, every) for r in refs])
    torch.testing.assert_close(_as_tensor(payload["model"]), expected, rtol=0, atol=1e-5)
    assert set(payload["layers"]) == set(LAYERS)
    for layer, modules in LAYERS.items():
        torch.testing.assert_close(_as_tensor(payload["layers"][layer]),
                                   brute_cosine([_flat(r, modules) for r in refs]),
                                   rtol=0, atol=1e-5)
    assert abs(float(expected[0, 1] - expected[0, 2])) > 1e-3  # the order is observable

    # swapping the input order permutes the matrices
    idx = torch.tensor(ORDER)
    assert other["clients"] == ["gamma", "alpha", "beta"]
    torch.testing.assert_close(_as_tensor(other["model"]), expected[idx][:, idx], rtol=0,
                               atol=1e-5)
    for layer, matrix in payload["layers"].items():
        torch.testing.assert_close(_as_tensor(other["layers"][layer]),
                                   _as_tensor(matrix)[idx][:, idx], rtol=0, atol=1e-5)

    plot = adapters["root"] / "heat" / "sim.png"
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
    assert payload["plot"] == str(plot)


def _check_merge_output(method, payload, out, adapters):
    """The adapter PEFT loads from ``out`` is the weighted merge the command reported."""
    assert payload["ok"] is True
    assert Path(payload["output"]) == out
    assert payload["strategy"]["method"] == method
    equal = method == "fedit"
    folders = adapters["equal" if equal else "mixed"]
    refs = adapters["equal_refs" if equal else "mixed_refs"]
    saved = peft_reference(out)  # PeftModel.from_pretrained loads it
    weights = payload["weights"]
    for row in weights.values():
        assert sum(row) == pytest.approx(1.0, abs=1e-5)
    if method == "fedbip-l":
        assert set(weights) == set(LAYERS)
    if method == "fedit":  # ΔW = (Σ p s·B)(Σ p A), with A kept as merged
        stored = load_file(str(out / "adapter_model.safetensors"))
        raws = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
        p = weights["model"]
        for module in LORA:
            sum_a = sum(w * t[f"{PREFIX}{module}.lora_A.weight"].double()
                        for w, t in zip(p, raws, strict=True))
            sum_b = sum(w * r.scalings[module] * t[f"{PREFIX}{module}.lora_B.weight"].double()
                        for w, t, r in zip(p, raws, refs, strict=True))
            torch.testing.assert_close(stored[f"{PREFIX}{module}.lora_A.weight"].double(),
                                       sum_a, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(saved.deltas[module], sum_b @ sum_a, rtol=1e-4,
                                       atol=1e-4)
        return
    for module in LORA:  # rank 9 covers the stacked rank: the merge is exact
        key = LAYER_OF[module] if method == "fedbip-l" else "model"
        expected = sum(w * r.deltas[module] for w, r in zip(weights[key], refs, strict=True))
        torch.testing.assert_close(saved.deltas[module], expected, rtol=1e-4, atol=1e-4)
    key = "lm_head" if method == "fedbip-l" else "model"
    expected = sum(w * r.dense[HEAD] for w, r in zip(weights[key], refs, strict=True))
    torch.testing.assert_close(saved.dense[HEAD], expected, rtol=1e-4, atol=1e-4)


def test_merge_subprocess_writes_a_peft_loadable_adapter(adapters, runs):
    result = runs["merge"]
    assert result.returncode == 0, result.stderr
    _check_merge_output("fedbip-l", json.loads(result.stdout), adapters["root"] / "merged",
                        adapters)


@pytest.mark.parametrize("method", METHODS)
def test_merge_every_strategy(adapters, tmp_path, method):
    from typer.testing import CliRunner

    from cli.main import app

    folders = adapters["equal" if method == "fedit" else "mixed"]
    args = ["merge", *map(str, folders), "--for", "1", "--strategy", method, "--rank", "9",
            "--out", str(tmp_path / method), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    _check_merge_output(method, payload, tmp_path / method, adapters)
    if method == "local":
        assert payload["weights"]["model"] == [0.0, 1.0, 0.0]
    if method == "uniform":
        assert payload["weights"]["model"] == pytest.approx([1 / 3] * 3, abs=1e-6)
    # the human-readable form works too
    result = CliRunner().invoke(app, [*args[:-1], "--out", str(tmp_path / "table")])
    assert result.exit_code == 0, result.output
    assert "written to" in result.stdout


def test_similarity_table_output(adapters):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["similarity", *map(str, adapters["mixed"]),
                                      "--granularity", "module"])
    assert result.exit_code == 0, result.output
    for name in ("alpha", "beta", "gamma", Q0, HEAD):
        assert name in result.stdout


def test_missing_folder_error_has_a_hint(runs):
    plain = runs["missing"]
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    lines = plain.stderr.splitlines()
    assert any(line.startswith("Error:") and "no-such-adapter" in line for line in lines)
    assert any(line.startswith("Hint:") for line in lines)
    assert plain.stdout == ""


def test_json_errors(adapters, runs):
    result = runs["missing_json"]
    assert result.returncode == 1
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["error"] == "AdapterError"
    assert "no-such-adapter" in payload["message"] and payload["hint"]
    assert not (adapters["root"] / "o1").exists()


@pytest.mark.parametrize(("args", "code", "error"), [
    (["--strategy", "fedmagic"], 2, "ConfigError"),
    (["--for", "5"], 2, "ConfigError"),
    (["--rule", "median"], 2, "ConfigError"),
    (["--strategy", "fedit"], 1, "IncompatibleAdaptersError"),  # mixed ranks
])
def test_merge_errors_in_process(adapters, tmp_path, args, code, error):
    from typer.testing import CliRunner

    from cli.main import app

    base = ["merge", *map(str, adapters["mixed"]), "--for", "0", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*base, *args, "--json"])
    assert result.exit_code == code, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["error"] == error and payload["hint"]
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == code
    assert "Error:" in result.stderr and "Hint:" in result.stderr


def test_merge_for_takes_a_client_name_or_an_index(adapters, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    folders = [str(f) for f in adapters["mixed"]]  # alpha, beta, gamma
    outputs = {}
    for target in ("beta", "1"):
        result = CliRunner().invoke(app, ["merge", *folders, "--for", target, "--out",
                                          str(tmp_path / target), "--json"])
        assert result.exit_code == 0, result.output
        outputs[target] = json.loads(result.stdout)
    assert outputs["beta"]["target"] == outputs["1"]["target"] == "beta"
    assert outputs["beta"]["weights"] == outputs["1"]["weights"]
    assert ((tmp_path / "beta" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "1" / "adapter_model.safetensors").read_bytes())
    result = CliRunner().invoke(app, ["merge", *folders, "--for", "bta", "--out",
                                      str(tmp_path / "x"), "--json"])
    assert result.exit_code == 2
    assert "Did you mean 'beta'" in json.loads(result.stdout)["message"]
