"""The served stream model under faults, on a real tritonserver (loopback): a request whose state cannot be
saved changes nothing, a model that cannot load says why at once, one stream has one holder among the
servers sharing a state directory, and a second client of one stream id is told."""

import numpy as np
import pytest
import torch

from infini_deploy.errors import InfiniError
from infini_deploy.runtime import Stream
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.runtime.serving.remote import RemoteStream, ServerError

pytestmark = [pytest.mark.server, pytest.mark.slow]
TEXT = np.random.default_rng(1).integers(0, 256, 600)


def local(export_dir):
    return Stream(OrtRunner(export_dir, threads=1), decode_runner=OrtRunner(export_dir, threads=1, graph="decode"),
                  chunk_runner=OrtRunner(export_dir, threads=1, graph="chunk"))


def test_a_request_whose_state_cannot_be_saved_changes_nothing(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    server = serve(tiny_fp32, threads=1, state_dir=str(state), persist="every")
    remote, near = RemoteStream(server.url, stream_id=7, request_tokens=1000), local(tiny_fp32)
    remote.feed(TEXT[:300], "none"), near.feed(TEXT[:300], "none")
    assert remote.persisted == 300
    snapshot = state / "7.safetensors"
    snapshot.unlink()
    snapshot.mkdir()          # the next write of stream 7 fails, as on a full disk (and whoever runs the server)
    with pytest.raises(ServerError, match=r"stream 7 could not be saved, so this request was undone \(the stream "
                                          r"stays at token 300; send it again\)"):
        remote.feed(TEXT[300:500], "last")
    assert remote.position == 300
    snapshot.rmdir()          # space again: the client sends the same request, and it is fed once
    assert torch.equal(remote.feed(TEXT[300:500], "last"), near.feed(TEXT[300:500], "last"))
    assert remote.position == near.position == 500 and remote.persisted == 500


def test_a_model_that_cannot_load_says_why_at_once(serve, tiny_fp32, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    server = serve(tiny_fp32, start=False, threads=1, state_dir=str(blocker / "state"))   # no CLI check here
    with pytest.raises(InfiniError, match=r"the served model did not load: the state directory .*a-file/state "
                                          r"cannot be created: Not a directory"):
        server.start(timeout=120)            # tritonserver 2.51 alone waits for that instance forever
    assert server.process.poll() is not None                 # and the hung server was not left behind


def test_a_stream_open_on_one_server_is_refused_by_another_sharing_its_state(serve, tiny_fp32, tmp_path):
    state = tmp_path / "state"
    a = serve(tiny_fp32, repo_name="a", threads=1, state_dir=str(state))
    b = serve(tiny_fp32, repo_name="b", threads=1, state_dir=str(state))
    one = RemoteStream(a.url, stream_id=5)
    one.feed(TEXT[:100], "none")
    with pytest.raises(ServerError, match=rf"stream 5 is open in another process \(pid \d+, a model instance of "
                                          rf"tritonserver pid {a.process.pid}\) serving the state directory {state}"):
        RemoteStream(b.url, stream_id=5).feed(TEXT[:10], "none")
    assert RemoteStream(b.url, stream_id=6).open() == 0       # other streams are served as before
    assert one.end() == 100                                   # released: b takes the stream over where a left it
    assert RemoteStream(b.url, stream_id=5).open() == 100


def test_a_second_client_of_one_stream_id_is_told_instead_of_interleaved(serve, tiny_fp32):
    server = serve(tiny_fp32, threads=1)
    first, near = RemoteStream(server.url, stream_id=12), local(tiny_fp32)
    first.feed(TEXT[:100], "none"), near.feed(TEXT[:100], "none")
    second = RemoteStream(server.url, stream_id=12)            # continues the stream where it is: token 100
    second.feed(TEXT[100:150], "none"), near.feed(TEXT[100:150], "none")
    with pytest.raises(ServerError, match=r"stream 12 is at token 150, not at token 100 where this client left it: "
                                          r"another client is feeding the same stream id"):
        first.feed(TEXT[150:200], "last")
    assert first.position == 100
    assert torch.equal(second.feed(TEXT[150:200], "last"), near.feed(TEXT[150:200], "last"))   # nothing interleaved
    assert second.position == near.position == 200
