"""The families from GGUF files, written here the way llama.cpp's convert_hf_to_gguf.py writes them
(tests/llama_fixtures.py: write_family_gguf): what transformers' GGUF reader rebuilds converts and equals the
model the file was written from; what it would misread (RoPE scaling, partial rotary, a head size or attention
scale it takes from a default) is refused by name, before a wrong model could pass a parity check against an
equally wrong reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from infini_deploy.models import load_checkpoint  # noqa: E402
from infini_deploy.models.checkpoint import checkpoint_tokenizer  # noqa: E402
from infini_deploy.models.convert import convert  # noqa: E402
from infini_deploy.models.convert.validate import CLOSED, _logits  # noqa: E402

from llama_fixtures import FAMILY_TEMPLATES, tiny_family, write_family_gguf  # noqa: E402

TOLERANCE = 1e-5   # as for the folders (test_families.py): measured 2e-7 to 7e-7 here


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3", "phi3"])
def test_a_gguf_converts_to_the_model_it_was_written_from(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = tiny_family(tmp_path / "src", family, seed=5, gguf=True)
    result = convert(write_family_gguf(src, tmp_path / f"{family}.gguf"), tmp_path / "out", segment_len=64)
    assert result.source_kind == "gguf" and result.parity.ok and result.parity.max_abs < TOLERANCE
    tokens = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(tokens).logits[0]
        got = _logits(load_checkpoint(tmp_path / "out"), tokens, CLOSED)
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)
    tok = checkpoint_tokenizer(tmp_path / "out")
    text = "The grass is green. κόσμος"
    assert tok.decode(tok.encode(text)) == text and tok.chat_template == FAMILY_TEMPLATES[family]
    if family in ("gemma3", "phi3"):   # llama.cpp's window reaches the config (transformers maps phi3's not)
        window = 128 if family == "gemma3" else 256
        assert result.model.config.sliding_window == window
        assert any(f"window {window}): exact" in note for note in result.notes)


REFUSALS = [   # (id, family, tiny_family arguments, what the one line must say)
    ("llama3-rope-freqs", "llama3", {}, "does not read its RoPE frequency factors (rope_freqs.weight"),
    ("gemma3-linear-scaling", "gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
     "does not read its rope scaling (linear, factor 8.0)"),
    ("gemma3-query-scale", "gemma3", {"head_dim": 16},
     "does not read its attention scale (1/sqrt(16) in llama.cpp, read as 1/sqrt(256))"),
    ("phi3-longrope", "phi3", {"gguf": False}, "does not read its RoPE frequency factors (rope_factors_long.weight"),
    ("phi3-partial-rotary", "phi3", {"partial_rotary_factor": 0.75},
     "does not read its partial rotary embedding (rope.dimension_count 12 of 16 dims)"),
    ("qwen3-head-size", "qwen3", {"head_dim": 16},
     "does not read its head size (attention.key_length 16, read as 128)"),
]


@pytest.mark.parametrize("family, kwargs, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_gguf_transformers_would_misread_is_one_line_exit_2(tmp_path, family, kwargs, message):
    from click.testing import CliRunner

    from infini_deploy.tools.cli import cli

    kwargs = {"gguf": True, **kwargs}
    src = tiny_family(tmp_path / "src", family, gguf=kwargs.pop("gguf"), **kwargs)
    gguf_file, out = write_family_gguf(src, tmp_path / "m.gguf"), tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(gguf_file), str(out), "--segment-len", "64"],
                             catch_exceptions=False)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert message in lines[0] and "convert the Hugging Face folder instead" in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"]
