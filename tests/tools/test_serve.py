"""`infini serve` (the repository; --start on a real server), `infini bench feed` and `infini bench serve`."""

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers import invoke


def test_serve_writes_a_repository_and_refuses_bad_options(tiny_fp32, tmp_path):
    res = invoke("serve", tiny_fp32, "--repo", tmp_path / "repo", "--strategy", "direct", "--max-streams", "3")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "direct strategy, 3 streams per instance" in res.output
    assert 'string_value: "3"' in (tmp_path / "repo/infini_stream/config.pbtxt").read_text()
    for args, message in [
        (["--repo", tmp_path / "repo"], "exists"),                                   # without --force
        (["--repo", tmp_path / "r2", "--persist", "every"], "--persist every needs a --state-dir"),
        (["--repo", tmp_path / "r3", "--strategy", "fifo"], "'fifo' is not one of"),
    ]:
        res = invoke("serve", tiny_fp32, *args)
        assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_bench_feed_measures_both_steps_and_their_logits_agree(tmp_path):
    res = invoke("bench", "feed", "tiny", "--tokens", "160", "--pieces", "1,16,N", "--json-out", tmp_path / "f.json")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [(r["piece"], r["step"]) for r in rows] == [(p, s) for p in (1, 16, 64) for s in ("segment", "chunk")]
    assert all(r["tokens"] == 160 and r["logits_max_abs_vs_teacher_forced"] < 1e-4 for r in rows)
    res = invoke("bench", "feed", "tiny", "--pieces", "0,N")
    assert res.exit_code == 2 and "every size must be at least 1" in res.output
    res = invoke("bench", "feed", "tiny", "--pieces", "a")
    assert res.exit_code == 2 and "expected sizes in tokens separated by commas" in res.output


@pytest.mark.server
@pytest.mark.slow
def test_bench_serve_checks_every_reply_against_the_local_run(tiny_fp32, tmp_path):
    pytest.importorskip("pytriton")
    res = invoke("bench", "serve", tiny_fp32, "--streams", "3", "--tokens", "200", "--request-tokens", "70",
                 "--max-batch", "2", "--json-out", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["mismatched_replies"] == 0 and not report["errors"]
    assert report["served"]["requests"] == 3 * 3 and report["streams"] == 3
    assert "mismatched replies: 0" in res.output


@pytest.mark.server
@pytest.mark.slow
def test_serve_start_serves_until_sigterm_and_stops_its_server(tiny_fp32, tmp_path):
    pytest.importorskip("pytriton")
    from infini_deploy.runtime.serving.remote import RemoteStream

    proc = subprocess.Popen([str(Path(sys.executable).parent / "infini"), "serve", str(tiny_fp32), "--repo",
                             str(tmp_path / "repo"), "--state-dir", str(tmp_path / "state"), "--threads", "1",
                             "--start"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:                              # "serving on http://127.0.0.1:PORT ..."
            if line.startswith("serving on http://"):
                url = line.split("http://")[1].split()[0].rstrip(";")
                break
        assert url and url.startswith("127.0.0.1:"), url
        remote = RemoteStream(url, stream_id=9)
        assert remote.feed(list(range(100)), "last").shape == (1, 260)
        (tmp_path / "in.txt").write_text("héllo, served world\n" * 20)                 # 420 bytes
        res = invoke("run", tiny_fp32, "--server", url, "--stream-id", 9, "--text", tmp_path / "in.txt",
                     "--no-end", "--no-progress")
        assert res.exit_code == 0 and "streamed 420 tokens" in res.output and "now at token 520" in res.output, \
            res.output
        res = invoke("generate", tiny_fp32, "--server", url, "--stream-id", 9, "--prompt", "ab",
                     "--max-new-tokens", 5, "--no-progress")
        assert res.exit_code == 0, res.output
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "tritonserver stopped" in rest, rest
        assert (tmp_path / "state" / "9.safetensors").is_file()    # the open stream persisted at shutdown
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2)
    finally:
        if proc.poll() is None:                               # a failed assertion: still stop the server
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_openai_flags_are_checked_before_anything_starts(tiny_fp32, tmp_path):
    from helpers import one_line_error

    one_line_error(invoke("serve", tiny_fp32, "--openai"), "--openai needs --start")
    one_line_error(invoke("serve", tiny_fp32, "--openai", "--start", "--repo", tmp_path / "repo", "--max-batch", "4"),
                   "--repo, --max-batch: Triton's options; --openai serves the export in this process")
    one_line_error(invoke("serve", tiny_fp32, "--repo", tmp_path / "repo", "--port", "9000"), "--port needs --openai")
    one_line_error(invoke("serve", tiny_fp32), "--repo DIR is required")
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_the_readme_openai_commands_serve_and_answer(chat_export, tmp_path):
    """The README's `infini serve ... --openai --start` line and its `python -c` client, run on the tiny chat
    export (the SmolLM2 conversion before them is the `real` tests' business): a session answers."""
    import re
    import shlex

    pytest.importorskip("openai")
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"## Talk to it with any OpenAI client.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    serve_argv, client_line = shlex.split(lines[1]), lines[2]
    assert serve_argv[:2] == ["infini", "serve"] and "--openai" in serve_argv and "--start" in serve_argv
    model = serve_argv[2]
    argv = [sys.executable, "-m", "infini_deploy.tools.entry", "serve", str(chat_export), *serve_argv[3:],
            "--model-name", model, "--port", "0", "--threads", "1"]
    argv[argv.index("sessions")] = str(tmp_path / "sessions")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        while not seen or "serving the OpenAI API on" not in seen[-1]:
            seen.append(process.stdout.readline())
            assert seen[-1], "".join(seen)
        port = re.search(r"127\.0\.0\.1:(\d+)", seen[-1]).group(1)
        code = shlex.split(client_line)[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        assert list((tmp_path / "sessions").glob("*.safetensors"))   # --persist every: the session is on disk
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
