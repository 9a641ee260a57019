"""A signal during `infini train passkey` and `infini train lm` (real processes, real signals).

During the training steps, SIGINT, SIGTERM and SIGHUP stop training after the current step: the checkpoint of
the steps done and its log are written, and the command exits 0 saying it stopped early (docs/training.md).
Ctrl-C used to exit 130 with nothing written: the CLI's handler recorded the signal, and the atomic write of
the checkpoint then refused to commit. Outside the steps (start-up, the trainer's own set-up before its first
step, the final save), a signal leaves the outputs as they were and exits 128 + signal, as for any command;
so does a second signal during the steps (stop now, save nothing).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infini_deploy.models.checkpoint import load_checkpoint

STEPS = 100_000   # never reached: the signal always lands during training
PASSKEY = ["train", "passkey", "out", "--preset", "tiny", "--steps", STEPS, "--batch", 2, "--min-segments", 6,
           "--max-segments", 6, "--dilute", 0, "--threads", 1, "--no-progress"]
LM = ["train", "lm", "tiny", "out", "--data", "train.txt", "--steps", STEPS, "--batch", 2, "--segments", 3,
      "--eval-tokens", 2000, "--threads", 1, "--no-progress", "--autocast", "off"]
COMMANDS = {"passkey": PASSKEY, "lm": LM}

# Runs the CLI with one function replaced by a pause: it touches READY, then waits for GO (a signal that raises
# ends the wait at once), then runs the real function. The test sends its signal between the two.
PAUSED = """
import sys, time
from importlib import import_module
from pathlib import Path

target, ready, go, *argv = sys.argv[1:]
module_name, name = target.split(":")
module = import_module(module_name)
real = getattr(module, name)

def paused(*args, **kwargs):
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    return real(*args, **kwargs)

setattr(module, name, paused)
sys.argv = ["infini", *argv]
from infini_deploy.tools.entry import main
main()
"""


@pytest.fixture
def workdir(tmp_path):
    rng = random.Random(0)
    words = "the keeper lit the lamp at six and rang the bell until morning while two boats came in".split()
    (tmp_path / "train.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return tmp_path


def start(argv, cwd, *prefix):
    return subprocess.Popen([sys.executable, *prefix, *map(str, argv)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".infini-tmp-" in p.name or p.name.endswith(".infini-lock"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["passkey", "lm"])
def test_a_signal_during_training_saves_the_steps_done_and_exits_0(workdir, command, signum):
    proc = start(COMMANDS[command], workdir, "-m", "infini_deploy.tools.entry")
    for line in proc.stdout:   # the first progress line: training is under way
        if line.startswith("step 10:"):
            break
    else:
        pytest.fail(f"no progress line; stderr: {proc.stderr.read()}")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and f"stopped early ({signum.name})" in out, (out, err)
    load_checkpoint(workdir / "out")
    log = json.loads((workdir / "out/train_log.json").read_text())
    assert log["stopped_by"] == "interrupted" and 10 <= log["steps_done"] < STEPS
    if command == "lm":   # resumable from exactly there
        state = json.loads((workdir / "out/train_state.json").read_text())
        assert state["step"] == log["steps_done"] and (workdir / "out/optimizer.safetensors").is_file()
    assert leftovers(workdir) == []


@pytest.mark.slow
@pytest.mark.parametrize("command, pause, steps", [
    ("passkey", "infini_deploy.models.checkpoint:init_model", STEPS),   # start-up: the model is being made
    ("passkey", "infini_deploy.models.train.passkey:make_optimizer", STEPS),   # in the trainer, before its first step
    ("passkey", "infini_deploy.models.checkpoint:write_checkpoint", 3),  # the final save
    ("lm", "infini_deploy.tools.train.lm:_documents", STEPS),           # start-up: the data is being read
    ("lm", "infini_deploy.models.train.lm:SegmentLoss", STEPS),      # in the trainer, before its first step
    ("lm", "infini_deploy.models.train.lm_run:write_run", 3),                   # the final save
], ids=lambda v: v.rsplit(":", 1)[-1] if isinstance(v, str) else None)
def test_a_signal_outside_the_training_steps_leaves_no_output_and_exits_130(workdir, command, pause, steps):
    ready, go = workdir / "ready", workdir / "go"
    argv = [steps if a == STEPS else a for a in COMMANDS[command]]
    proc = start([pause, ready, go, *argv], workdir, "-c", PAUSED)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    go.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, (out, err)
    assert "Traceback" not in err and "interrupted (SIGINT): outputs left as they were" in err, err
    assert not (workdir / "out").exists() and leftovers(workdir) == []


@pytest.mark.slow
@pytest.mark.parametrize("command, pause", [("passkey", "infini_deploy.models.train.passkey:make_batch"),
                                            ("lm", "infini_deploy.models.train.loop:lr_scale")])
def test_a_second_signal_during_training_stops_at_once_with_nothing_written(workdir, command, pause):
    ready, go = workdir / "ready", workdir / "go"
    proc = start([pause, ready, go, *COMMANDS[command]], workdir, "-c", PAUSED)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)   # the first: heard, training would stop after this step
    for line in proc.stderr:
        if line.startswith("SIGINT: stopping after this step"):
            break
    proc.send_signal(signal.SIGINT)   # the second: stop now
    go.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, (out, err)
    assert "Traceback" not in err and "interrupted (SIGINT): outputs left as they were" in err, err
    assert not (workdir / "out").exists() and leftovers(workdir) == []
