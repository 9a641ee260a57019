"""`infini bench openai`: a real `infini serve --openai --start` process measured with the `openai` client."""

import json

import pytest

from helpers import invoke, one_line_error

pytest.importorskip("openai")
pytest.importorskip("uvicorn")


@pytest.mark.slow
def test_bench_openai_measures_sessions_and_a_long_session(chat_export, tmp_path):
    res = invoke("bench", "openai", chat_export, "--sessions", "1,3", "--turns", "2", "--max-tokens", "5",
                 "--long-turns", "12", "--threads", "1", "--json-out", tmp_path / "o.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o.json").read_text())
    rows = report["concurrent"]
    assert [r["sessions"] for r in rows] == [1, 3] and not any(r["errors"] for r in rows)
    assert [r["tokens"] for r in rows] == [1 * 2 * 5, 3 * 2 * 5]   # ignore_eos: every turn its max_tokens
    assert all(r["ttft_ms_p50"] > 0 and r["aggregate_tokens_per_s"] > 0 for r in rows)
    long = report["long_session"]
    assert long["turns"] == 12 and len(long["turn_ms"]) == 12 and long["session_tokens"] > 12 * 5
    assert report["cpu"]["cpus"] >= 1 and "3 sessions: time to first token" in res.output


def test_bench_openai_refuses_bad_session_counts(chat_export):
    one_line_error(invoke("bench", "openai", chat_export, "--sessions", "0,4"), "--sessions '0,4': expected counts")
