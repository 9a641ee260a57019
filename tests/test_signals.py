"""SIGINT, SIGTERM and SIGKILL at random moments of export, build, save-state and train (real processes).

After each signal the output is absent, or complete and consistent (every file its manifest lists, with its
hash; a snapshot that loads; a checkpoint with its log). After SIGINT and SIGTERM no temporary and no lock is
left; after SIGKILL the next run of the same command removes what the killed one left. The moments are drawn
from a seeded RNG over the command's measured duration, so a run is reproducible;
INFINI_SIGNAL_TRIALS=N draws N moments per signal instead of 2.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infini_deploy.errors import InfiniError

TRIALS = int(os.environ.get("INFINI_SIGNAL_TRIALS", "2"))
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
CLI = [sys.executable, "-c", "from infini_deploy.tools.entry import main; main()"]


def start(argv, cwd):
    return subprocess.Popen([*CLI, *map(str, argv)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def timed(argv, cwd) -> float:
    began = time.perf_counter()
    proc = start(argv, cwd)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    return time.perf_counter() - began


def interrupt(argv, cwd, signum, delay) -> int:
    proc = start(argv, cwd)
    time.sleep(delay)
    proc.send_signal(signum)
    code = proc.wait(timeout=300)
    stderr = proc.stderr.read().decode()
    assert "Traceback" not in stderr, stderr
    return code


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".infini-tmp-" in p.name or p.name.endswith(".infini-lock"))


def check_export(folder: Path, killed: bool = False) -> None:
    """Every listed file there with its hash; no engine nobody names (a SIGKILL may leave one for the next
    build to remove) and no temporary inside."""
    from infini_deploy.export.engine import is_engine_name
    from infini_deploy.models.manifest import load_manifest

    m = load_manifest(folder)
    for name in m.files:
        m.verify(folder, name)
    if not killed:
        named = {e["file"] for e in m.tensorrt.get("engines", {}).values()}
        assert {p.name for p in folder.iterdir() if is_engine_name(p.name)} == named
        assert leftovers(folder) == []


def check_snapshot(path: Path, killed: bool = False) -> None:
    from infini_deploy.models import init_model, preset
    from infini_deploy.runtime import Stream, TorchRunner

    assert Stream.load(path, TorchRunner(init_model(preset("tiny"), seed=0))).position > 0


def check_checkpoint(folder: Path, killed: bool = False) -> None:
    from infini_deploy.models.checkpoint import load_checkpoint

    load_checkpoint(folder)
    assert (folder / "train_log.json").is_file()


def campaign(tmp_path, argv, output: Path, check, prepare=lambda: None):
    """Every signal at TRIALS moments: after each, the output is absent or consistent; then a clean run."""
    prepare()
    duration = timed(argv, tmp_path)
    check(output)
    outcomes = []
    rng = random.Random(f"{argv[0]}-{argv[1]}")
    for signum in SIGNALS:
        for _ in range(TRIALS):
            prepare()
            delay = rng.uniform(0.2, duration)
            code = interrupt(argv, tmp_path, signum, delay)
            if output.exists():
                try:
                    check(output, killed=signum == signal.SIGKILL)
                except (InfiniError, AssertionError) as e:
                    pytest.fail(f"{signal.Signals(signum).name} at {delay:.2f} s of {duration:.2f} s left "
                                f"{output} inconsistent: {e}")
            if signum != signal.SIGKILL:
                assert leftovers(output.parent) == [], (signum, delay)
                # 128 + n: stopped by the CLI; -n: the signal came after the command's work (interpreter exit)
                assert code in (0, 128 + signum, -signum), (signum, delay, code)
            outcomes.append((signal.Signals(signum).name, round(delay, 2), code, output.exists()))
    prepare()
    assert subprocess.run([*CLI, *map(str, argv)], cwd=tmp_path, capture_output=True).returncode == 0
    check(output)
    assert leftovers(output.parent) == []   # the killed runs' temporaries are gone
    return outcomes


def _remove(path: Path):
    def prepare():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return prepare


@pytest.mark.slow
def test_signals_during_export(tmp_path):
    out = tmp_path / "e"
    campaign(tmp_path, ["export", "tiny", out, "--force"], out, check_export)


@pytest.mark.slow
def test_signals_during_save_state(tmp_path):
    out = tmp_path / "s.st"
    campaign(tmp_path, ["run", "tiny", "--tokens", "300k", "--save-state", out, "--force", "--no-progress",
                        "--threads", "1"], out, check_snapshot, _remove(out))


@pytest.mark.slow
def test_signals_during_train(tmp_path):
    out = tmp_path / "t"
    campaign(tmp_path, ["train", "passkey", out, "--preset", "tiny", "--steps", "30", "--batch", "2",
                        "--min-segments", "6", "--max-segments", "6", "--threads", "1", "--no-progress"],
             out, check_checkpoint, _remove(out))


@pytest.mark.slow
@pytest.mark.tensorrt
def test_signals_during_build(tmp_path, export_factory):
    out = tmp_path / "b"
    shutil.copytree(export_factory("fp16"), out)
    campaign(tmp_path, ["build", out, "--max-batch", "2"], out, check_export)
