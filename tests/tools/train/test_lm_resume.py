"""`infini train lm --resume` of a damaged checkpoint: one line naming the file and what was expected, exit 2,
nothing written (each case printed a traceback before: JSONDecodeError, SafetensorError, KeyError, ...)."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import invoke, one_line_error

OPTIONS = ["--batch", 2, "--segments", 3, "--eval-tokens", 500, "--threads", 1, "--no-progress", "--autocast", "off"]


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 10 steps (a checkpoint to resume) and its training text."""
    root = tmp_path_factory.mktemp("resume")
    rng = random.Random(0)
    words = "the keeper lit the lamp at six and rang the bell until morning while two boats came in".split()
    (root / "train.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    res = invoke("train", "lm", "tiny", root / "run", "--data", root / "train.txt", "--steps", 10, *OPTIONS)
    assert res.exit_code == 0, res.output
    return root


def edit_json(name, change):
    def apply(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return apply


def truncate(name):
    def apply(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return apply


def remove(name):
    return lambda folder: (folder / name).unlink()


def edit_tensors(change):
    def apply(folder):
        tensors = load_file(str(folder / "optimizer.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "optimizer.safetensors"))
    return apply


def first_moment(tensors):
    return next(k for k in sorted(tensors) if k.startswith("exp_avg/"))


CASES = {
    "state-truncated": (truncate("train_state.json"), "train_state.json is not valid JSON"),
    "state-not-an-object": (lambda f: (f / "train_state.json").write_text("[1, 2]"),
                            "train_state.json holds a JSON list; expected an object with step, train_config"),
    "step-negative": (edit_json("train_state.json", lambda d: d.update(step=-3)),
                      "train_state.json: step is -3; expected the number of steps done (a whole number, 0 or more)"),
    "step-a-string": (edit_json("train_state.json", lambda d: d.update(step="10")),
                      'train_state.json: step is "10"; expected the number of steps done'),
    "step-beyond-steps": (edit_json("train_state.json", lambda d: d.update(step=50)),
                          "train_state.json records step 50, beyond --steps 20: pass --steps 50 or more"),
    "base-missing": (edit_json("train_state.json", lambda d: d.pop("base")),
                     "train_state.json: base is missing; expected the base model's weights_sha256 and config_digest"),
    "data-wrong-type": (edit_json("train_state.json", lambda d: d.update(data={"train": "train.txt"})),
                        "train_state.json: data is {\"train\": \"train.txt\"}; expected the training files"),
    "config-wrong-type": (edit_json("train_state.json", lambda d: d.update(train_config=[])),
                          "train_state.json: train_config is []; expected the run's options (an object)"),
    "optimizer-truncated": (truncate("optimizer.safetensors"),
                            "optimizer.safetensors is corrupt or truncated"),
    "optimizer-garbage": (lambda f: (f / "optimizer.safetensors").write_bytes(b"\xff" * 64),
                          "optimizer.safetensors is corrupt or truncated"),
    "optimizer-missing": (remove("optimizer.safetensors"),
                          "optimizer.safetensors is missing; expected the optimizer state of the run"),
    "moment-wrong-shape": (edit_tensors(lambda t: t.update({first_moment(t): torch.zeros(3)})),
                           "is torch.float32 of shape (3,); expected float of shape"),
    "moment-missing": (edit_tensors(lambda t: t.pop(first_moment(t))),
                       "expected exp_avg, exp_avg_sq, step (AdamW's state)"),
    "param-missing": (edit_tensors(lambda t: t.pop(next(k for k in sorted(t) if k.startswith("param/")))),
                      "optimizer.safetensors holds no param/"),
    "log-truncated": (truncate("train_log.json"), "train_log.json is not valid JSON"),
    "log-missing": (remove("train_log.json"), "training log"),
    "log-wrong-type": (edit_json("train_log.json", lambda d: d.update(log={})),
                       'train_log.json holds no "log" list; expected the log entries of the run'),
}


@pytest.mark.parametrize("damage, message", CASES.values(), ids=CASES.keys())
def test_resume_of_a_damaged_checkpoint_is_one_line_exit_2_and_writes_nothing(run, tmp_path, damage, message):
    out = tmp_path / "out"
    shutil.copytree(run / "run", out)
    damage(out)
    before = tree(tmp_path)
    res = invoke("train", "lm", "tiny", out, "--data", run / "train.txt", "--steps", 20, "--resume", *OPTIONS)
    one_line_error(res, message)
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
