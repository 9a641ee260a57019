"""`infini demo`: a clear error without the bundled checkpoint; with one, a short run end to end."""

import re

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
    again = CliRunner().invoke(cli, args + ["--length", "2k"])   # --length overrides --tokens
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
