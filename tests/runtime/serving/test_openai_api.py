"""The OpenAI-compatible server (runtime/serving/openai_api.py, openai_engine.py) on 127.0.0.1, spoken to by the
official `openai` package: answers equal the in-process generation, sessions equal the stateless conversation,
concurrent sessions stay apart, bad requests get OpenAI-shaped errors while the others go on."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "tiny-chat"


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def local(export, ids, max_tokens, **sampling):
    """(tokens, text) of the in-process generation over the same runners: the reference."""
    from infini_deploy.runtime.open import model_tokenizer, open_stream

    tokenizer = model_tokenizer(str(export))
    stream, _ = open_stream(str(export), "onnxruntime", threads=1)
    out = stream.generate(torch.tensor(ids), max_tokens, stop_tokens=tokenizer.stop_ids, **sampling)[0].tolist()
    return out, tokenizer.decode(out)


def tokenizer_of(export):
    from infini_deploy.runtime.open import model_tokenizer

    return model_tokenizer(str(export))


def streamed(chunks, chat=True):
    """(text, finish_reason, usage) of a server-sent-events answer."""
    text, finish, usage = [], None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            piece = choice.delta.content if chat else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_completions_equal_the_local_generation_streamed_or_not(chat_export, openai_server):
    server = openai_server(chat_export)
    api = client(server)
    assert [m.id for m in api.models.list().data] == [MODEL]
    tok = tokenizer_of(chat_export)
    prompt = "The harbour town sits where a slow river meets a cold sea."
    want, text = local(chat_export, [*tok.start_ids, *tok.encode(prompt)], 24)
    r = api.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(want)
    assert r.usage.prompt_tokens == len(tok.start_ids) + len(tok.encode(prompt))
    assert r.choices[0].finish_reason == ("stop" if want[-1] in tok.stop_ids else "length")
    s = streamed(api.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                        stream_options={"include_usage": True}), chat=False)
    assert s[0] == text and s[1] == r.choices[0].finish_reason and s[2].completion_tokens == len(want)
    ids = [int(i) for i in (*tok.start_ids, *tok.encode(prompt))]   # a prompt of token ids is the same request
    assert api.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0).choices[0].text == text


def test_chat_equals_the_local_generation_greedy_and_seeded(chat_export, openai_server):
    server = openai_server(chat_export)
    api = client(server)
    tok = tokenizer_of(chat_export)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the light?"}]
    ids = tok.encode(tok.chat(messages, add_generation_prompt=True))
    for sampling in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}):
        want, text = local(chat_export, ids, 20, **sampling)
        r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **sampling)
        assert r.choices[0].message.content == text and r.usage.completion_tokens == len(want), sampling
        assert r.usage.prompt_tokens == len(ids)
        s = streamed(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}, **sampling))
        assert s[0] == text and s[1] == r.choices[0].finish_reason and s[2].completion_tokens == len(want)
    seeded = [api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=1.5,
                                          seed=s).choices[0].message.content for s in (1, 2)]
    assert seeded[0] != seeded[1]   # the seed is used, not ignored


def test_stop_strings_cut_the_reply_streamed_or_not(chat_export, openai_server):
    api = client(openai_server(chat_export))
    messages = [{"role": "user", "content": "Tell me about the harbour."}]
    sampling = {"temperature": 1.0, "seed": 3, "max_tokens": 24}
    full = api.chat.completions.create(model=MODEL, messages=messages, **sampling)
    text = full.choices[0].message.content
    at = next(i for i in range(3, len(text) - 1) if text[i:i + 2].isascii() and text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]   # two characters inside the reply, first seen there
    cut = text[:text.find(stop)]
    r = api.chat.completions.create(model=MODEL, messages=messages, stop=[stop, "zzz"], **sampling)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    s = streamed(api.chat.completions.create(model=MODEL, messages=messages, stop=stop, stream=True, **sampling))
    assert s[:2] == (cut, "stop")


def test_a_session_of_50_turns_equals_the_stateless_conversation(chat_export, openai_server, tmp_path):
    """Each turn sends only its new message; the last reply equals the stateless request given the whole history."""
    api = client(openai_server(chat_export, state_dir=tmp_path / "states"))
    history, position = [], 0
    for turn in range(50):
        message = {"role": "user", "content": f"Turn {turn}: wind west, two boats in."}
        r = api.chat.completions.create(model=MODEL, messages=[message], max_tokens=1 if turn < 49 else 12,
                                        temperature=0, extra_body={"session": "logbook"})
        history += [message, {"role": "assistant", "content": r.choices[0].message.content}]
        assert r.model_extra["session"]["tokens"] > position   # the session grows turn by turn
        before, position = position, r.model_extra["session"]["tokens"]
    assert position > 10 * 64   # the conversation crossed many segments: the memory carried it
    whole = api.chat.completions.create(model=MODEL, messages=history[:-1], max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == history[-1]["content"]
    assert whole.usage.prompt_tokens == before + r.usage.prompt_tokens   # the same tokens were fed, once
    info = json.loads(urllib.request.urlopen(f"{api.base_url}sessions/logbook").read())
    assert info["tokens"] == position and info["in_memory"]


def test_concurrent_sessions_stay_apart(chat_export, openai_server):
    api = client(openai_server(chat_export))
    users = [f"User {i} asks about boat {i * 7}." for i in range(4)]

    def conversation(name, i, out):
        replies = []
        for turn in range(3):
            chunks = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": users[i] * (turn + 1)}],
                                                 max_tokens=12, temperature=0, stream=True,
                                                 extra_body={"session": name})
            replies.append(streamed(chunks)[0])
        out[i] = replies

    alone = [None] * 4
    for i in range(4):
        conversation(f"alone-{i}", i, alone)
    together = [None] * 4
    threads = [threading.Thread(target=conversation, args=(f"together-{i}", i, together)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert len({tuple(r) for r in alone}) > 1   # the sessions did differ


def _post(server, path, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(f"{server.url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_sessions_go_on(chat_export, openai_server):
    server = openai_server(chat_export)
    api = client(server)
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    first = api.chat.completions.create(**ok, extra_body={"session": "steady"})
    for body, status, param, message in [
        ({**ok, "model": "gpt-4o"}, 404, "model", "the model 'gpt-4o' does not exist on this server; it serves"),
        ({**ok, "messages": [{"role": "user"}]}, 400, "messages[0].content", "must be a string"),
        ({**ok, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]", "a 'role' in system"),
        ({**ok, "messages": []}, 400, "messages", "non-empty list"),
        ({**ok, "max_tokens": -5}, 400, "max_tokens", "an integer in [1, 1048576], got -5"),
        ({**ok, "max_tokens": "ten"}, 400, "max_tokens", "an integer in [1, 1048576], got \"ten\""),
        ({**ok, "temperature": "hot"}, 400, "temperature", "a number in [0, 2]"),
        ({**ok, "n": 3}, 400, "n", "'n' must be 1"),
        ({**ok, "stream": "yes"}, 400, "stream", "true or false"),
        ({**ok, "logprobs": True}, 400, "logprobs", "not supported"),
    ]:
        code, answer = _post(server, "/chat/completions", body)
        assert code == status and set(answer["error"]) == {"message", "type", "param", "code"}, answer
        assert answer["error"]["param"] == param and message in answer["error"]["message"], answer
        assert "\n" not in answer["error"]["message"]
    code, answer = _post(server, "/chat/completions", b'{"model": "tiny-chat", "messages": [', raw=True)
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)   # a body past 16 MiB: refused
    connection.putrequest("POST", "/v1/completions")                                # before it is sent
    connection.putheader("Content-Length", str(17 << 20))
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413 and "longer than 16,777,216 bytes" in json.loads(reply.read())["error"]["message"]
    connection.close()
    code, answer = _post(server, "/completions", {"model": MODEL, "prompt": [5, 300]})
    assert code == 400 and "token id 300 outside the vocabulary [0, 300)" in answer["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist on this server"):
        api.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    # the session that was there before the errors goes on where it was
    again = api.chat.completions.create(**ok, extra_body={"session": "steady"})
    assert again.model_extra["session"]["tokens"] > first.model_extra["session"]["tokens"]


def test_a_deleted_session_starts_again_empty(chat_export, openai_server):
    server = openai_server(chat_export)
    api = client(server)
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    first = api.chat.completions.create(**ok, extra_body={"session": "gone"})
    request = urllib.request.Request(f"{server.url}/sessions/gone", method="DELETE")
    assert json.loads(urllib.request.urlopen(request).read())["deleted"] is True
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.url}/sessions/gone")
    assert e.value.code == 404 and "not held by this server" in json.loads(e.value.read())["error"]["message"]
    again = api.chat.completions.create(**ok, extra_body={"session": "gone"})
    assert again.model_extra["session"] == first.model_extra["session"]   # the same first turn, from nothing
    assert again.choices[0].message.content == first.choices[0].message.content


@pytest.mark.slow
def test_infini_serve_openai_survives_a_kill_with_persist_every(chat_export, tmp_path):
    """`infini serve --openai --start --persist every`, SIGKILL, start again: the session continues as if
    nothing had happened (against the same conversation on an uninterrupted server)."""
    import re
    import subprocess
    import sys

    def start():
        process = subprocess.Popen([sys.executable, "-m", "infini_deploy.tools.entry", "serve", str(chat_export),
                                    "--openai", "--start", "--port", "0", "--threads", "1", "--model-name", MODEL,
                                    "--state-dir", str(tmp_path / "states"), "--persist", "every"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        while not seen or not (found := re.search(r"serving the OpenAI API on (http://127\.0\.0\.1:\d+/v1)", seen[-1])):
            seen.append(process.stdout.readline())
            assert seen[-1], "".join(seen)   # it exited before serving
        return process, openai.OpenAI(base_url=found.group(1), api_key="unused", max_retries=0, timeout=120)

    turns = [[{"role": "user", "content": f"Log entry {i}: glass cleaned at noon."}] for i in range(4)]
    process, api = start()
    try:
        replies = [api.chat.completions.create(model=MODEL, messages=m, max_tokens=5, temperature=0,
                                               extra_body={"session": "keeper"}) for m in turns[:2]]
        process.kill()
        process.wait(30)
        process, api = start()
        replies += [api.chat.completions.create(model=MODEL, messages=m, max_tokens=5, temperature=0,
                                                extra_body={"session": "keeper"}) for m in turns[2:]]
    finally:
        process.kill()
        process.wait(30)
    from infini_deploy.runtime.serving.openai_api import OpenAIServer, engine_from_export

    with OpenAIServer(engine_from_export(chat_export, MODEL, threads=1), port=0) as server:
        plain = client(server)
        want = [plain.chat.completions.create(model=MODEL, messages=m, max_tokens=5, temperature=0,
                                              extra_body={"session": "keeper"}) for m in turns]
    assert [r.choices[0].message.content for r in replies] == [r.choices[0].message.content for r in want]
    assert [r.model_extra["session"] for r in replies] == [r.model_extra["session"] for r in want]


def test_a_busy_session_a_full_server_and_a_session_of_another_model_are_refused(chat_export, tiny_fp32,
                                                                                 openai_server, tmp_path):
    server = openai_server(chat_export, max_streams=1, state_dir=tmp_path / "states")
    api = client(server)
    hello = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    long = api.chat.completions.create(**hello, max_tokens=1000, stream=True, extra_body={"session": "a",
                                                                                           "ignore_eos": True})
    next(iter(long))   # the first chunk: session "a" is being served
    with pytest.raises(openai.ConflictError, match="session 'a' is serving another request"):
        api.chat.completions.create(**hello, max_tokens=2, extra_body={"session": "a"})
    with pytest.raises(openai.RateLimitError, match=r"this server holds 1 sessions \(its --max-streams\)"):
        api.chat.completions.create(**hello, max_tokens=2, extra_body={"session": "b"})
    assert streamed(long)[1] == "length"   # the long reply went on to its end
    assert api.chat.completions.create(**hello, max_tokens=2).usage.completion_tokens == 2   # stateless: no slot
    server.stop()   # session "a" persisted
    other = openai_server(tiny_fp32, state_dir=tmp_path / "states")   # another model over the same state directory
    code, answer = _post(other, "/completions", {"model": MODEL, "prompt": "x", "session": "a"})
    assert code == 422 and answer["error"]["code"] == "unprocessable", answer
    assert "model" in answer["error"]["message"], answer
    code, answer = _post(other, "/chat/completions", {**hello, "session": "c"})
    assert code == 400 and "no chat template" in answer["error"]["message"]


@pytest.mark.slow
def test_an_attend_previous_export_serves_and_one_without_a_decode_step_is_refused(tmp_path):
    """attend_previous exports have decode and chunk steps that read past (runtime/stream.py carries it); an
    export made before (segment.onnx only) cannot generate and is refused before serving."""
    import dataclasses
    import json
    import shutil

    from infini_deploy.errors import BadInputError
    from infini_deploy.export.exporter import export_model
    from infini_deploy.models import init_model, preset
    from infini_deploy.runtime.serving.openai_api import engine_from_export

    export_model(init_model(dataclasses.replace(preset("tiny"), attend_previous=True), seed=0), tmp_path / "ap")
    engine = engine_from_export(tmp_path / "ap")
    assert engine.pool.runner.config.attend_previous and engine.pool.decode_runner is not None
    engine.pool.close()
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "ap", old)
    manifest = json.loads((old / "infini.json").read_text())
    for graph in ("decode", "chunk"):
        del manifest["graphs"][graph]
        manifest["files"].pop(f"{graph}.onnx")
        (old / f"{graph}.onnx").unlink()
    (old / "infini.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="no decode graph .* export the model again with `infini export`"):
        engine_from_export(old)
