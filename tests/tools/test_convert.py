"""`infini convert` through the CLI: what it prints, and every bad source as one line, exit 2, nothing written.

docs/errors.md ("Conversion") lists these cases; keep the two in step.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from infini_deploy.tools.cli import cli  # noqa: E402

from llama_fixtures import tiny_llama, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("src") / "llama")


def edited(tmp, src, **changes):
    folder = shutil.copytree(src, tmp / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def without(tmp, src, name):
    folder = shutil.copytree(src, tmp / "without")
    (folder / name).unlink()
    return folder


def cut(tmp, src, name, keep=0.5):
    folder = shutil.copytree(src, tmp / "cut")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:int(len(data) * keep)])
    return folder


def pickled_only(tmp, src):
    folder = without(tmp, src, "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return folder


def other_vocabulary(tmp, src):
    """A model of 280 ids carrying the 300-id tokenizer of another model."""
    folder = tiny_llama(tmp / "v280", vocab_size=280)
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    return folder


def garbage(tmp, name, data=b"not a gguf at all"):
    (tmp / name).write_bytes(data)
    return tmp / name


# (id, setup(tmp, llama source) -> SRC, message the one line must contain)
CASES = [
    ("no-config", lambda t, s: without(t, s, "config.json"), "has no config.json: it is not a Hugging Face model folder"),
    ("unsupported-architecture", lambda t, s: edited(t, s, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     "model_type 'gpt2' (GPT2LMHeadModel) is not supported; supported: llama"),
    # yarn converts now (tests/models/convert); a rope type without an implementation is still refused
    ("rope-scaling", lambda t, s: edited(t, s, rope_scaling={"rope_type": "proportional", "factor": 4.0}),
     "llama with rope scaling 'proportional' is not supported (implemented: linear, llama3, yarn, dynamic, longrope)"),
    ("moe", lambda t, s: edited(t, s, num_local_experts=8), "llama with a mixture of experts (num_local_experts 8)"),
    # a window the segment fits in converts now; one shorter than the segment is refused
    ("sliding-window", lambda t, s: edited(t, s, model_type="mistral", sliding_window=32),
     "mistral with sliding-window attention (sliding_window 32) is exact only for segments of at most 32 tokens"),
    ("tokenizer-other-vocabulary", other_vocabulary,
     "tokenizer.json has ids up to 299 but the model's vocabulary has 280 ids"),
    ("no-tokenizer", lambda t, s: without(t, s, "tokenizer.json"), "has no tokenizer.json"),
    ("shapes-do-not-match", lambda t, s: edited(t, s, hidden_size=96),
     "has shape (300, 64), its config implies (300, 96)"),
    ("truncated-safetensors", lambda t, s: cut(t, s, "model.safetensors"), "is truncated"),
    ("pickled-weights-only", pickled_only, "pickled weights are never loaded"),
    ("truncated-gguf", lambda t, s: write_gguf(s, t / "cut.gguf", truncate_to=-2000), "is truncated"),
    ("gguf-header-only", lambda t, s: write_gguf(s, t / "head.gguf", truncate_to=64), "is truncated or corrupt"),
    ("not-a-gguf", lambda t, s: garbage(t, "x.gguf"), "is not a GGUF file (it starts with b'not '"),
    ("neither", lambda t, s: garbage(t, "weights.txt"), "is neither a folder nor a .gguf file"),
    ("missing", lambda t, s: t / "nowhere", "does not exist; expected a Hugging Face model folder or a .gguf file"),
]


@pytest.mark.parametrize("setup, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_source_is_one_line_exit_2_and_writes_nothing(tmp_path, llama, setup, message):
    src = setup(tmp_path, llama)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--segment-len", "64"], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert message in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_convert_prints_the_parity_and_refuses_an_existing_folder(tmp_path, llama):
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["convert", str(llama), str(out), "--segment-len", "64", "--gate-init", "-5"])
    assert res.exit_code == 0, res.output
    assert "4 query / 2 KV heads of 16, vocabulary 300, segment 64, linear rule, gates at beta -5" in res.output
    assert "validated against transformers, gates closed, 64 probe tokens in one segment" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    again = CliRunner().invoke(cli, ["convert", str(llama), str(out)])
    assert again.exit_code == 2 and "exists; choose a new folder or pass --force" in again.output


def test_convert_gives_attend_previous_by_default_and_segment_local_when_asked(tmp_path, llama):
    """The default is the variant that remembers more and models language better (docs/conversion.md)."""
    from infini_deploy.models.checkpoint import load_config

    res = CliRunner().invoke(cli, ["convert", str(llama), str(tmp_path / "ap"), "--segment-len", "64", "--no-validate"])
    assert res.exit_code == 0 and "the previous segment attended" in res.output, res.output
    assert "of the previous segment's keys and values) per stream" in res.output
    assert load_config(tmp_path / "ap").attend_previous is True
    res = CliRunner().invoke(cli, ["convert", str(llama), str(tmp_path / "sl"), "--segment-len", "64", "--no-validate",
                                   "--segment-local"])
    assert res.exit_code == 0 and "previous segment" not in res.output, res.output
    assert load_config(tmp_path / "sl").attend_previous is False
