"""Every option that takes a text file refuses bytes that are not UTF-8 text, with the line `run --input` gives
(hardening issue, bug 11): `--haystack` of `infini passkey`, `infini demo --model smollm2` and `infini train
passkey` took random bytes as prose (passkey exited 0, the SmolLM2 demo reported RETRIEVED on them).
"""

from __future__ import annotations

import random

import pytest

from infini_deploy.errors import BadInputError
from infini_deploy.models import init_model, preset
from infini_deploy.models.checkpoint import save_checkpoint
from infini_deploy.paths import check_text_file
from helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """256 KiB of random bytes after "ok \\xff": enough "sentences" (a '.' then a space) to pass for a haystack."""
    path = tmp_path_factory.mktemp("noise") / "noise.txt"
    path.write_bytes(b"ok \xff" + random.Random(0).randbytes(256 << 10))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(init_model(preset("tiny"), seed=0), folder)
    return folder


NOT_TEXT = "is not UTF-8 text (bad byte at offset 3)"


def test_passkey_haystack_of_random_bytes_is_refused(noise):
    one_line_error(invoke("passkey", "tiny", "--lengths", "512", "--depths", "0.5", "--haystack", noise,
                          "--no-progress"), f"--haystack {noise} {NOT_TEXT}")


def test_demo_smollm2_haystack_of_random_bytes_is_refused_before_the_model_is_read(noise):
    one_line_error(invoke("demo", "--model", "smollm2", "--haystack", noise, "--no-progress"),
                   f"--haystack {noise} {NOT_TEXT}")


def test_train_passkey_haystack_of_random_bytes_is_refused(noise, tmp_path):
    res = invoke("train", "passkey", tmp_path / "out", "--preset", "tiny", "--steps", 1, "--batch", 1,
                 "--min-segments", 8, "--max-segments", 8, "--haystack", noise,
                 "--no-progress")
    one_line_error(res, f"--haystack {noise} {NOT_TEXT}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, args", [
    ("--text", lambda c, f, t: ["run", c, "--text", f, "--no-progress"]),
    ("prompt file", lambda c, f, t: ["generate", c, "--prompt-file", f, "--no-progress"]),
    ("prompt file", lambda c, f, t: ["generate", c, "--prompt-file", f, "--chat", "--no-progress"]),
    ("file", lambda c, f, t: ["eval", "ppl", c, f]),
    ("--data", lambda c, f, t: ["train", "lm", c, t / "out", "--data", f, "--no-progress"]),
    ("--held-out", lambda c, f, t: ["train", "lm", c, t / "out", "--data", t / "prose.txt", "--held-out", f,
                                    "--no-progress"]),
], ids=["run-text", "generate-prompt-file", "generate-chat-prompt-file", "eval-ppl", "train-lm-data",
        "train-lm-held-out"])
def test_every_text_option_gives_the_same_line(noise, ckpt, tmp_path, option, args):
    (tmp_path / "prose.txt").write_text("Plain prose. " * 400)
    one_line_error(invoke(*args(ckpt, noise, tmp_path)), f"{option} {noise} {NOT_TEXT}")
    assert not (tmp_path / "out").exists()


def test_the_check_reads_the_whole_file_or_its_start(tmp_path):
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 100_000 + b"\xff")
    with pytest.raises(BadInputError, match=r"--haystack .*late.txt is not UTF-8 text \(bad byte at offset 100000\)"):
        check_text_file(late, "--haystack")
    assert check_text_file(late, "--input", scan=1 << 16) == late   # the stream checks the rest as it reads
    cut = tmp_path / "cut.txt"
    cut.write_bytes("é".encode()[:1])
    with pytest.raises(BadInputError, match="ends inside a UTF-8 character"):
        check_text_file(cut, "--input", scan=1 << 16)
    ids = tmp_path / "ids.npy"
    ids.write_bytes(b"\x93NUMPY\x01\x00")
    assert check_text_file(ids, "--input", npy=True) == ids
    with pytest.raises(BadInputError, match="is not UTF-8 text"):
        check_text_file(ids, "--haystack")
