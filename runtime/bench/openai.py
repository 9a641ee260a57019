"""``openai_benchmark``: the OpenAI-compatible server (``infini serve --openai --start``) in its own process,
spoken to by the official ``openai`` package, as users' clients would.

- **Concurrent sessions.** For each S in ``sessions``, S sessions at once, each ``turns`` streamed chat turns of
  ``max_tokens`` tokens (``ignore_eos``: every turn generates them all). Per turn: the time to the first text
  (TTFT) and the session's decode rate (tokens after the first over the time after the first); per S: their
  percentiles and the aggregate tokens/s.
- **One long session.** ``long_turns`` turns of one session, each sending only its new message: the wall time
  of every turn (turn 1,000 must cost what turn 2 costs: the history is in the fixed-size state) and the
  server's RSS along the way.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

from .measure import percentile, process_tree_rss

URL = re.compile(r"serving the OpenAI API on (http://127\.0\.0\.1:\d+/v1)")


def cpu_description() -> dict:
    """The CPU's model name and the flags that decide the fast paths here (bf16, VNNI, AMX)."""
    model, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    import os

    return {"model": model, "flags": [f for f in wanted if f in flags], "cpus": os.cpu_count()}


def start_server(command: list[str], timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start ``command`` (``infini serve ... --openai --start --port 0``); (the process, its /v1 URL) once it
    says where it serves. It dies with this process (the serving launcher's parent-death signal)."""
    from ..serving.server import die_with_parent

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=die_with_parent())
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = URL.search(line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()   # keep it drained
            return process, found.group(1)
    process.kill()
    raise RuntimeError("the OpenAI server did not start: " + " | ".join(x.strip() for x in seen[-3:]))


def openai_benchmark(command: list[str], model: str, sessions=(1, 4, 16), turns: int = 3, max_tokens: int = 32,
                     long_turns: int = 1000, long_max_tokens: int = 4, rss_every: int = 50) -> dict:
    import openai

    process, url = start_server(command)
    try:
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
        rss_start = process_tree_rss(process.pid)
        rows = [_concurrent(api, model, s, turns, max_tokens) for s in sessions]
        long = _long_session(api, model, long_turns, long_max_tokens, lambda: process_tree_rss(process.pid),
                             rss_every) if long_turns else None
        rss_end = process_tree_rss(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"command": command, "concurrent": rows, "long_session": long, "server_rss_start_bytes": rss_start,
            "server_rss_end_bytes": rss_end, "cpu": cpu_description()}


def _turn(api, model: str, session: str, text: str, max_tokens: int) -> dict:
    began, first, tokens = time.perf_counter(), None, 0
    for chunk in api.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                             max_tokens=max_tokens, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"session": session, "ignore_eos": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    end = time.perf_counter()
    first = first if first is not None else end
    return {"ttft_s": first - began, "seconds": end - began, "tokens": tokens,
            "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None}


def _concurrent(api, model: str, sessions: int, turns: int, max_tokens: int) -> dict:
    results, errors = [], []

    def session(i):
        try:
            for t in range(turns):
                results.append(_turn(api, model, f"bench-{sessions}-{i}",
                                     f"Session {i}, turn {t}: tell me what the harbour keeper wrote today.", max_tokens))
        except Exception as e:   # noqa: BLE001 (reported)
            errors.append(f"session {i}: {type(e).__name__}: {e}")

    began = time.perf_counter()
    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ttft = sorted(r["ttft_s"] * 1e3 for r in results)
    rates = sorted(r["decode_tokens_per_s"] for r in results if r["decode_tokens_per_s"])
    tokens = sum(r["tokens"] for r in results)
    return {"sessions": sessions, "turns": turns, "max_tokens": max_tokens, "errors": errors,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p90": percentile(ttft, 90),
            "session_tokens_per_s_p50": percentile(rates, 50), "session_tokens_per_s_p10": percentile(rates, 10),
            "aggregate_tokens_per_s": tokens / wall, "tokens": tokens, "seconds": wall}


def _long_session(api, model: str, turns: int, max_tokens: int, rss, rss_every: int) -> dict:
    times, rss_trace, position = [], [], 0
    for t in range(turns):
        began = time.perf_counter()
        r = api.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                        messages=[{"role": "user", "content": f"Log entry {t}: wind west, two boats in."}],
                                        extra_body={"session": "bench-long", "ignore_eos": True})
        times.append(time.perf_counter() - began)
        position = r.model_extra["session"]["tokens"]
        if t == 1 or (t + 1) % rss_every == 0:
            rss_trace.append({"turn": t + 1, "session_tokens": position, "rss_bytes": rss()})
    early, late = sorted(times[1:11]), sorted(times[-10:])
    return {"turns": turns, "max_tokens": max_tokens, "session_tokens": position,
            "turn_ms": [round(x * 1e3, 2) for x in times],
            "turns_2_to_11_ms_p50": percentile([x * 1e3 for x in early], 50),
            "last_10_turns_ms_p50": percentile([x * 1e3 for x in late], 50),
            "ratio_last_to_early": percentile(late, 50) / percentile(early, 50), "rss_trace": rss_trace}
