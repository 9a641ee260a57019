import numpy as np
import pytest

from infini_deploy.errors import BadInputError
from infini_deploy.models.passkey import FILLER, INTRO, QUESTION, PasskeyPrompt
from infini_deploy.models.tokenizer import encode
from helpers import PROSE


def test_the_prompt_is_the_papers_format():
    p = PasskeyPrompt(1024, 0.5, seed=1)
    text = p.text()
    needle = f"The pass key is {p.key}. Remember it. {p.key} is the pass key."
    assert text.startswith(INTRO + " " + FILLER) and text.endswith(FILLER + " " + QUESTION)
    assert text.count(needle) == 1 and text.count(FILLER) > 5
    assert 1024 - len(FILLER) - 1 < len(p) == len(text.encode()) <= 1024
    assert 10_000 <= p.key < 100_000 and p.answer == f" {p.key}"


@pytest.mark.parametrize("depth", [0, 0.25, 0.5, 1])
def test_the_needle_sits_at_the_depth(depth):
    p = PasskeyPrompt(8192, depth, seed=2)
    text = p.text()
    needle_at = text.index("The pass key is")
    filler_span = len(text) - len(INTRO) - len(QUESTION)
    assert abs((needle_at - len(INTRO)) / filler_span - depth) < 0.02
    if depth == 0:
        assert text[len(INTRO) + 1:].startswith("The pass key is")
    if depth == 1:
        assert text[:-len(QUESTION) - 1].endswith("is the pass key.")


def test_prompts_are_deterministic_given_a_seed_and_stream_in_chunks():
    a, b, c = PasskeyPrompt(4096, 0.3, 5), PasskeyPrompt(4096, 0.3, 5), PasskeyPrompt(4096, 0.3, 6)
    assert a.text() == b.text() and a.key == b.key and a.key != c.key
    chunks = list(a.chunks(chunk=500))
    assert len(chunks) > 5 and all(ch.dtype == np.int64 for ch in chunks)
    assert [len(ch) for ch in chunks[:-1]] == [500] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= 500  # exact
    assert np.array_equal(np.concatenate(chunks), encode(a.text()))


def test_varied_filler_is_seeded_and_not_the_fixed_text():
    v1, v2 = PasskeyPrompt(4096, 0.5, 1, "varied"), PasskeyPrompt(4096, 0.5, 1, "varied")
    assert v1.text() == v2.text() != PasskeyPrompt(4096, 0.5, 1).text()
    assert v1.text() != PasskeyPrompt(4096, 0.5, 2, "varied").text()
    assert v1.text().count(FILLER) < 3 and len(v1) <= 4096 and v1.key == PasskeyPrompt(4096, 0.5, 1).key


def test_checking_an_answer_reads_the_first_number():
    p = PasskeyPrompt(1024, 0, seed=3)
    assert p.check(f" {p.key}.") and p.check(str(p.key))
    assert not p.check(f" {p.key}7") and not p.check(" x") and not p.check(f" {p.key // 10}")


def test_bad_prompts_are_refused():
    with pytest.raises(BadInputError, match=r"depth must be in \[0, 1\], got 1.5"):
        PasskeyPrompt(4096, 1.5, 0)
    with pytest.raises(BadInputError, match="too short for a passkey prompt; expected at least"):
        PasskeyPrompt(100, 0.5, 0)
    with pytest.raises(BadInputError, match="expected one of: fixed, varied"):
        PasskeyPrompt(4096, 0.5, 0, filler="random")


def test_prose_haystack_prompts_have_the_exact_length_in_a_bpe_tokenizer(tmp_path):
    from infini_deploy.models.tokenizer import load_tokenizer
    from infini_deploy.models.passkey import Haystack

    from helpers import write_tiny_tokenizer

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    (tmp_path / "prose.txt").write_text(PROSE)
    hay = Haystack.from_files([tmp_path / "prose.txt"])
    assert hay.sentences[2] == "A light stood on the rocks at the mouth of the river!"
    for length in (300, 301, 517, 2048):
        for depth in (0.0, 0.5, 1.0):
            p = PasskeyPrompt(length, depth, seed=length, filler="prose", tokenizer=tok, haystack=hay)
            ids = np.concatenate(list(p.piece_ids()))
            assert len(p) == len(ids) == length, (length, depth)
            text = p.text()
            assert text.startswith(INTRO) and text.endswith(QUESTION) and str(p.key) in text
            assert any(s in text for s in hay.sentences)                     # the haystack's own sentences
    a = PasskeyPrompt(800, 0.5, seed=1, filler="prose", tokenizer=tok, haystack=hay).text()
    b = PasskeyPrompt(800, 0.5, seed=2, filler="prose", tokenizer=tok, haystack=hay).text()
    assert a != b and a == PasskeyPrompt(800, 0.5, seed=1, filler="prose", tokenizer=tok, haystack=hay).text()


def test_a_bytes_prose_prompt_is_exact_too_and_prose_needs_a_haystack():
    from infini_deploy.models.passkey import Haystack

    hay = Haystack([PROSE])
    p = PasskeyPrompt(1000, 0.3, seed=4, filler="prose", haystack=hay)
    assert len(p) == 1000 == len(np.concatenate(list(p.chunks(64))))
    with pytest.raises(BadInputError, match="filler 'prose' takes a haystack"):
        PasskeyPrompt(1000, 0.3, seed=4, filler="prose")
    with pytest.raises(BadInputError, match="a haystack needs at least 6"):
        Haystack(["One sentence. Two."], "tiny.txt")


def test_byte_filler_from_prose_may_cut_inside_a_character(tmp_path):
    # a cut in the middle of "é" (2 bytes) once stopped a training run after 385 steps with "not UTF-8 text"
    from infini_deploy.models.passkey import Haystack, filler_tokens

    haystack = Haystack(["Café au lait. " * 4 + "Résumé of the day. " * 4])
    lengths = set()
    for n in range(1, 40):
        ids = filler_tokens(n, 0, haystack=haystack)
        assert ids.dtype == np.int64 and len(ids) == n and ids.max() < 256
        lengths.add(n)
    assert any(bytes(filler_tokens(n, 0, haystack=haystack).astype(np.uint8).tolist())[-1:] == b"\xc3"
               for n in lengths)   # some cut does split a character
