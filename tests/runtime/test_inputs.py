import numpy as np
import pytest

from infini_deploy.errors import BadInputError
from infini_deploy.models.tokenizer import BOS, decode, encode
from infini_deploy.runtime.inputs import iter_tokens


def test_tokenizer_round_trips_any_text():
    text = "Infini-attention: 1M tokens, κόσμος, 流れ 🌊"
    ids = encode(text, bos=True)
    assert ids[0] == BOS and ids.dtype == np.int64 and ids.max() < 256 + 4
    assert decode(ids) == text
    with pytest.raises(BadInputError, match="not UTF-8"):
        encode(b"\xff\xfe")


def test_text_file_in_chunks_with_a_limit_cycles(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo world")
    data = np.frombuffer("héllo world".encode(), np.uint8)
    chunks = list(iter_tokens(f, chunk=3))
    assert np.array_equal(np.concatenate(chunks), data) and max(map(len, chunks)) == 3
    got = np.concatenate(list(iter_tokens(f, limit=30, chunk=4)))
    assert np.array_equal(got, np.resize(data, 30))


def test_npy_token_files(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(10, dtype=np.int32))
    assert np.array_equal(np.concatenate(list(iter_tokens(tmp_path / "ids.npy", chunk=4))), np.arange(10))
    np.save(tmp_path / "bad.npy", np.zeros((2, 2)))
    with pytest.raises(BadInputError, match="expected 1-D integer token ids"):
        list(iter_tokens(tmp_path / "bad.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match="not a plain .npy array"):
        list(iter_tokens(tmp_path / "obj.npy"))


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(BadInputError, match="is empty"):
        list(iter_tokens(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("ok caf\xe9 ok".encode("latin-1"))
    with pytest.raises(BadInputError, match="not UTF-8 text \\(bad byte at offset 6\\)"):
        list(iter_tokens(tmp_path / "latin1.txt", chunk=4))
    (tmp_path / "cut.txt").write_bytes("ok é".encode()[:-1])
    with pytest.raises(BadInputError, match="truncated"):
        list(iter_tokens(tmp_path / "cut.txt"))
    with pytest.raises(BadInputError, match="does not exist"):
        list(iter_tokens(tmp_path / "nope.txt"))
