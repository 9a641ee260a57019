"""`infini bench generate`: real runs on the tiny preset, segment-local and attend_previous; figures are not
asserted (machines differ), what they describe is."""

import json

import pytest

from infini_deploy.models.config import preset
from helpers import invoke, one_line_error


@pytest.mark.parametrize("attend_previous", [False, True], ids=["segment-local", "attend_previous"])
def test_bench_generate_times_the_positions_asked_and_counts_the_state(tmp_path, attend_previous):
    out = tmp_path / "generate.json"
    res = invoke("bench", "generate", "tiny", "--segment-len", "16", *(["--attend-previous"] * attend_previous),
                 "--positions", "N-1,1,0", "--repeat", "2", "--new-tokens", "20", "--threads", "1",
                 "--autocast", "off", "--json-out", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    cfg = preset("tiny", segment_len=16, attend_previous=attend_previous)
    assert (report["segment_len"], report["attend_previous"], report["backend"]) == (16, attend_previous, "torch")
    assert [r["position"] for r in report["positions"]] == [0, 1, 15]
    assert all(r["decode_ms"] > 0 and r["rerun_ms"] > 0 for r in report["positions"])
    assert report["new_tokens"] == 20 and report["prefill_tokens"] == 2 * 16 + 3
    assert report["state_bytes"] == cfg.state_bytes(1) + cfg.past_bytes(1)   # past at its steady N + SINKS
    assert report["machine"]["cores"] >= 1 and "cpu" in report["machine"]


def test_bench_generate_refuses_a_place_outside_the_segment():
    res = invoke("bench", "generate", "tiny", "--positions", "1,64")
    one_line_error(res, "--positions '1,64': every place must be in [0, N-1] = [0, 63]")
    res = invoke("bench", "generate", "tiny", "--positions", "N+1")
    one_line_error(res, "--positions 'N+1': expected places separated by commas, e.g. 1,N-1")
