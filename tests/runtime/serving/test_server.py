"""The served stream model on a real tritonserver (loopback): remote streams equal local ones bit for bit,
survive a killed server, move between servers, and bad requests hurt only their own client."""

import shutil
import threading

import numpy as np
import pytest
import torch

from infini_deploy.models.checkpoint import load_checkpoint
from infini_deploy.runtime import Stream
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.runtime.serving.remote import RemoteStream, ServerError, StreamLostError

pytestmark = [pytest.mark.server, pytest.mark.slow]
GEN = np.random.default_rng(0)
TEXT = GEN.integers(0, 256, 1000)


def local(export_dir):
    return Stream(OrtRunner(export_dir, threads=1), decode_runner=OrtRunner(export_dir, threads=1, graph="decode"),
                  chunk_runner=OrtRunner(export_dir, threads=1, graph="chunk"))


def in_requests(stream, tokens, keep, size):
    """What a local stream gives when fed the way a RemoteStream sends: requests of ``size`` tokens (the logits
    of an unfinished segment depend on where requests cut it in the last bits: each request runs the chunk step
    over its own tokens, whose matmuls have their own shapes)."""
    outs = [stream.feed(tokens[s:s + size], "none" if keep == "last" and s + size < len(tokens) else keep)
            for s in range(0, len(tokens), size)]
    return torch.cat(outs, 1) if keep == "all" else outs[-1]


def pieces(tokens, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(tokens[start:start + n])
        start += n
    return out


@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory):
    from infini_deploy.export.exporter import export_model
    from infini_deploy.models.checkpoint import PASSKEY_MODEL as BUNDLED

    out = tmp_path_factory.mktemp("bundled") / "export"
    export_model(load_checkpoint(BUNDLED), out)
    return out


def test_remote_equals_local_bit_for_bit(serve, tiny_fp32, bundled_export):
    for export_dir in (tiny_fp32, bundled_export):
        server = serve(export_dir, threads=1)
        remote, near = RemoteStream(server.url, request_tokens=100), local(export_dir)
        for piece, keep in zip(pieces(TEXT, [1, 63, 200, 5, 131, 300]), ["last", "all", "last", "all", "none", "all"]):
            got, want = remote.feed(piece, keep), in_requests(near, piece, keep, 100)
            assert (got is None and want is None) or torch.equal(got, want.float()), keep
        prompt = GEN.integers(0, 256, 70)
        assert torch.equal(remote.generate(prompt, 20), near.generate(prompt, 20))
        assert remote.position == near.position == 700 + 70 + 20
        server.stop()


def test_sixteen_concurrent_streams_each_equal_their_solo_run(serve, tiny_fp32):
    server = serve(tiny_fp32, threads=1, max_batch=8)
    inputs = [GEN.integers(0, 256, 64 * 6 + i * 7) for i in range(16)]
    results, errors = {}, []

    def run(i):
        try:
            remote = RemoteStream(server.url, request_tokens=37 + i)   # requests of every size interleave
            results[i] = remote.feed(inputs[i], "all")
        except Exception as e:   # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i in range(16):   # its solo run: the same requests, alone
        assert torch.equal(results[i], in_requests(local(tiny_fp32), inputs[i], "all", 37 + i)), i


def test_a_killed_server_with_persist_every_loses_nothing(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    server = serve(tiny_fp32, threads=1, state_dir=str(state), persist="every")
    remote, near = RemoteStream(server.url, request_tokens=90), local(tiny_fp32)
    first, second = TEXT[:450], TEXT[450:]
    remote.feed(first, "none"), near.feed(first, "none")
    server.kill()                                  # SIGKILL: nothing runs on the way down
    restarted = _restart_at(serve, tiny_fp32, server, state, persist="every")   # the same address
    assert torch.equal(remote.feed(second, "all"), in_requests(near, second, "all", 90))
    assert remote.position == near.position == len(TEXT)
    restarted.stop()


def test_an_attend_previous_stream_served_equals_the_local_one_and_survives_a_kill(serve, previous_fp32, tmp_path):
    """Past carried per stream, persisted with M and z after every request, restored by a new server: fed and
    generated across many segments (N = 8), the remote stream gives the local one's logits and tokens."""
    state = tmp_path / "state"
    server = serve(previous_fp32, threads=1, state_dir=str(state), persist="every")
    remote, near = RemoteStream(server.url, request_tokens=30), local(previous_fp32)
    first, second = TEXT[:101], TEXT[101:160]
    assert torch.equal(remote.feed(first, "all"), in_requests(near, first, "all", 30).float())
    prompt = GEN.integers(0, 256, 5)
    assert torch.equal(remote.generate(prompt, 19), near.generate(prompt, 19))
    server.kill()                                  # SIGKILL: only what every request persisted survives
    restarted = _restart_at(serve, previous_fp32, server, state, persist="every")
    assert torch.equal(remote.feed(second, "all"), in_requests(near, second, "all", 30).float())
    assert torch.equal(remote.generate(prompt, 12), near.generate(prompt, 12))
    assert remote.position == near.position == 160 + 2 * 5 + 19 + 12
    restarted.stop()


def test_passkey_through_the_server_gives_the_in_process_answers(serve, previous_fp32, tmp_path):
    """`infini passkey --server`: every trial on one served stream, reset before each (RemoteStream.reset), gives
    the answers the export gives in process, trial for trial (an attend_previous model, N = 8, prompts of many
    segments)."""
    import json

    from helpers import invoke, one_line_error

    server = serve(previous_fp32, threads=1)
    grid = ["--lengths", "400,700", "--depths", "0,1", "--trials", 3, "--seed", 4, "--no-progress"]
    res = invoke("passkey", previous_fp32, *grid, "--server", server.url, "--stream-id", 77,
                 "--json-out", tmp_path / "served.json")
    assert res.exit_code == 0 and f"the stream 77 served at {server.url}" in res.output, res.output
    res = invoke("passkey", previous_fp32, *grid, "--backend", "onnxruntime", "--threads", 1,
                 "--json-out", tmp_path / "local.json")
    assert res.exit_code == 0, res.output
    served, near = (json.loads((tmp_path / f).read_text())["trials"] for f in ("served.json", "local.json"))
    assert len(served) == len(near) == 12
    assert [(t["length"], t["depth"], t["key"], t["generated"]) for t in served] == \
        [(t["length"], t["depth"], t["key"], t["generated"]) for t in near]
    left = RemoteStream(server.url, stream_id=77).open() - served[-1]["prompt_tokens"]   # reset: the last trial only
    assert 1 <= left <= 16, left
    one_line_error(invoke("passkey", previous_fp32, "--server", server.url, "--batch", 2),
                   "--batch cannot go with --server")
    server.stop()


def test_with_persistence_at_end_only_the_client_is_told_what_was_lost(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    server = serve(tiny_fp32, threads=1, state_dir=str(state))
    remote = RemoteStream(server.url, request_tokens=100)
    remote.feed(TEXT[:200], "none")
    assert remote.end() == 200                     # persisted at END
    remote.feed(TEXT[200:500], "none")
    server.kill()
    restarted = _restart_at(serve, tiny_fp32, server, state)
    with pytest.raises(StreamLostError, match="resumed stream .* at token 200; tokens 200..500 were lost"):
        remote.feed(TEXT[500:], "none")
    restarted.stop()


def test_a_server_stopped_with_sigterm_persists_its_open_streams(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    server = serve(tiny_fp32, threads=1, state_dir=str(state))    # persistence at END, idle and shutdown
    remote, near = RemoteStream(server.url, stream_id=31, request_tokens=150), local(tiny_fp32)
    remote.feed(TEXT[:410], "none"), near.feed(TEXT[:410], "none")
    assert remote.persisted == -1                  # nothing on disk yet: the stream is open
    server.stop()      # drain (the model persists its open streams), then SIGTERM: Triton, with a sequence
    assert (state / "31.safetensors").is_file()    # open, waits its exit timeout and never calls finalize()
    restarted = _restart_at(serve, tiny_fp32, server, state)
    assert torch.equal(remote.feed(TEXT[410:], "all"), in_requests(near, TEXT[410:], "all", 150))
    assert remote.position == near.position == len(TEXT)
    restarted.stop()


def test_a_stream_handed_over_between_two_servers_gives_the_local_result(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    a = serve(tiny_fp32, repo_name="a", threads=1, state_dir=str(state))
    b = serve(tiny_fp32, repo_name="b", threads=1, state_dir=str(state))
    near = local(tiny_fp32)
    one = RemoteStream(a.url, stream_id=4242)
    one.feed(TEXT[:333], "none"), near.feed(TEXT[:333], "none")
    one.end()                                      # a persists it into the shared state directory
    two = RemoteStream(b.url, stream_id=4242, request_tokens=1000)
    assert torch.equal(two.feed(TEXT[333:], "all"), near.feed(TEXT[333:], "all"))
    a.stop(), b.stop()


def test_bad_requests_fail_alone_and_the_server_stays_up(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    server = serve(tiny_fp32, threads=1, state_dir=str(state), max_streams=3)
    good = RemoteStream(server.url, stream_id=1)
    before = good.feed(TEXT[:100], "last")
    with pytest.raises(ServerError, match="holds id 999, outside the vocabulary"):
        RemoteStream(server.url, stream_id=2).feed([1, 2, 999])
    with pytest.raises(Exception, match="input 'TOKENS' data-type is 'FP32', but model 'infini_stream' expects 'INT64'"):
        _raw(server, np.array([[1.5]], np.float32), "FP32")      # what another client could send
    with pytest.raises(Exception, match="TOKENS must be one row|batch"):
        _raw(server, np.zeros((2, 3), np.int64), "INT64")
    RemoteStream(server.url, stream_id=2).feed([1]), RemoteStream(server.url, stream_id=3).feed([1])
    with pytest.raises(ServerError, match=r"holds 3 streams \(its --max-streams\)"):
        RemoteStream(server.url, stream_id=4).feed([1])
    (state / "77.safetensors").write_bytes(b"not a snapshot")
    shutil.copy(_foreign_snapshot(tmp_path), state / "78.safetensors")
    RemoteStream(server.url, stream_id=2).end(), RemoteStream(server.url, stream_id=3).end()
    with pytest.raises(ServerError, match="is not a snapshot or is corrupt"):
        RemoteStream(server.url, stream_id=77).feed([1])
    with pytest.raises(ServerError, match="saved from another model"):
        RemoteStream(server.url, stream_id=78).feed([1])
    assert server.ready("infini_stream")
    near = local(tiny_fp32)
    near.feed(TEXT[:100], "none")
    assert torch.equal(good.feed(TEXT[100:200], "last"), near.feed(TEXT[100:200], "last")) and before.shape == (1, 260)


def _raw(server, tokens, dtype):
    import tritonclient.http as http

    t = http.InferInput("TOKENS", list(tokens.shape), dtype)
    t.set_data_from_numpy(tokens)
    return http.InferenceServerClient(server.url).infer("infini_stream", [t], sequence_id=55, sequence_start=True)


def _foreign_snapshot(tmp_path):
    from infini_deploy.models import init_model, preset
    from infini_deploy.runtime import TorchRunner

    stream = Stream(TorchRunner(init_model(preset("tiny", segment_len=32))))
    stream.feed(torch.arange(40), keep="none")
    return stream.save(tmp_path / "foreign.st")


def _restart_at(serve, export_dir, old, state, **options):
    """A new server on the old one's ports over the same state directory (what a supervisor restarts)."""
    new = serve(export_dir, repo_name=f"restart-{old.ports['http']}", start=False, threads=1, state_dir=str(state),
                **options)
    new.ports = dict(old.ports)
    return new.start()
