"""Passkey retrieval prompts in the paper's format (arXiv 2404.07143, appendix B), streamed in chunks.

    INTRO  FILLER FILLER ... NEEDLE ... FILLER  QUESTION      -> answer " 9054"
           |<- depth x filler tokens ->|

A prompt is described by a small frozen dataclass and produced lazily,
chunk by chunk, so a 1M-token prompt is never one string. It is a pure
function of (length, depth, seed, filler): evaluation and training build the
same prompts from the same seeds. Lengths count tokens of the prompt's
tokenizer (models/tokenizer.py): UTF-8 bytes by default, a checkpoint's own
vocabulary when one is given. Each piece is encoded on its own (intro, then
" " + block, " " + needle, " " + question): with a real tokenizer a piece that
starts with a space starts a word, so the ids are those of the whole text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BadInputError
from ..paths import check_input_file, utf8_chunks
from .tokenizer import encode

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# filler="varied": each filler block is 5 sentences drawn from this pool (the paper's five first)
VARIED_SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "The night is dark.", "The road goes ever on.", "The wind is cold.",
    "The stones are grey.", "The bird sings at dawn.", "The snow is white.", "The hills are far away.",
)
FILLERS = ("fixed", "varied", "prose")   # prose: a Haystack of real text (PasskeyPrompt.haystack)
CHUNK = 1 << 16  # tokens per chunk, about


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt. ``len(prompt)`` is its exact token count (<= the requested length)."""

    length: int            # requested tokens; the prompt is the longest whole-block fit
    depth: float           # 0 = needle right after the intro, 1 = right before the question
    seed: int              # draws the key (and the varied filler)
    filler: str = "fixed"  # "fixed": the paper's block repeated; "varied": blocks of shuffled sentences
    digits: int = 5        # the key has this many digits (no leading zero)
    tokenizer: object = field(default=None, compare=False, repr=False)   # None: bytes (models/tokenizer.py)
    haystack: "Haystack | None" = field(default=None, compare=False, repr=False)   # filler="prose": its text

    def __post_init__(self):
        if (self.filler == "prose") != (self.haystack is not None):
            raise BadInputError("filler 'prose' takes a haystack of real text (and only it does): pass "
                                "--haystack FILE")
        if not 0 <= self.depth <= 1:
            raise BadInputError(f"depth must be in [0, 1], got {self.depth}")
        if self.filler not in FILLERS:
            raise BadInputError(f"filler {self.filler!r} is not known; expected one of: {', '.join(FILLERS)}")
        if not 1 <= self.digits <= 18:
            raise BadInputError(f"digits must be in 1..18, got {self.digits}")
        least = self._fixed() + self._count(b" " + FILLER.encode()) if self.tokenizer else self.shortest(self.digits)
        if self.length < least:
            raise BadInputError(f"length {self.length} is too short for a passkey prompt; expected at least "
                                f"{least} tokens")

    @staticmethod
    def shortest(digits: int = 5) -> int:
        """The least ``length`` a prompt of bytes accepts: intro, needle, question and one filler block."""
        return _fixed_bytes(digits) + len(FILLER) + 1

    @property
    def key(self) -> int:
        rng = random.Random(f"passkey-key/{self.seed}")
        return rng.randrange(10 ** (self.digits - 1), 10 ** self.digits)

    @property
    def answer(self) -> str:
        """The expected continuation, e.g. " 9054"."""
        return f" {self.key}"

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.piece_ids())

    def pieces(self) -> Iterator[bytes]:
        """The prompt as UTF-8 pieces (intro, filler blocks, needle, question), in order."""
        for piece, _ in self._layout():
            yield piece

    def piece_ids(self) -> Iterator[np.ndarray]:
        """The token ids of each piece, in order."""
        for _, ids in self._layout():
            yield ids

    def _layout(self) -> Iterator[tuple[bytes, np.ndarray]]:
        """(piece, its ids): the filler blocks fill the budget in tokens, the needle at the depth."""
        budget = self.length - self._fixed()              # tokens left for filler blocks
        needle_at = round(self.depth * budget)            # filler tokens before the needle, about
        yield INTRO.encode(), self._ids(INTRO.encode())
        used, placed = 0, False
        for block in self._blocks():
            ids = self._ids(b" " + block)
            if not placed and used + (len(ids) - 1) / 2 > needle_at:   # half the block, its space aside
                yield b" " + self._needle(), self._ids(b" " + self._needle())
                placed = True
            if used + len(ids) > budget:
                if self.haystack is not None and budget > used:   # prose: exactly ``length`` tokens, the last
                    part = ids[:budget - used]                     # block cut where the budget ends
                    yield self._piece_of(b" " + block, part), part
                break
            yield b" " + block, ids
            used += len(ids)
        if not placed:
            yield b" " + self._needle(), self._ids(b" " + self._needle())
        yield b" " + QUESTION.encode(), self._ids(b" " + QUESTION.encode())

    def chunks(self, chunk: int = CHUNK) -> Iterator[np.ndarray]:
        """The prompt's token ids (int64) in chunks of exactly ``chunk`` tokens, the last one shorter: prompts
        of one length give aligned chunks, so they stream side by side as batch rows."""
        buf, size = [], 0
        for ids in self.piece_ids():
            buf.append(ids)
            size += len(ids)
            if size >= chunk:
                flat = np.concatenate(buf)
                whole = size - size % chunk
                yield from (flat[i:i + chunk] for i in range(0, whole, chunk))
                buf, size = [flat[whole:]], size - whole
        if size:
            yield np.concatenate(buf)

    def text(self) -> str:
        """The whole prompt as one string: for tests and short prompts only."""
        return b"".join(self.pieces()).decode(errors="replace")

    def check(self, generated: str) -> bool:
        """True when the first number in ``generated`` is the key."""
        digits = ""
        for ch in generated.lstrip(" "):
            if not ch.isdigit():
                break
            digits += ch
        return digits == str(self.key)

    def _needle(self) -> bytes:
        return NEEDLE.format(key=self.key).encode()

    def _fixed(self) -> int:
        """Tokens of the intro, needle and question with their separating spaces."""
        if self.tokenizer is None:
            return _fixed_bytes(self.digits)
        return sum(self._count(p) for p in (INTRO.encode(), b" " + self._needle(), b" " + QUESTION.encode()))

    def _ids(self, piece: bytes) -> np.ndarray:
        return encode(piece) if self.tokenizer is None else _encode_cached(self.tokenizer, piece)

    def _count(self, piece: bytes) -> int:
        return len(self._ids(piece))

    def _blocks(self) -> Iterator[bytes]:
        if self.haystack is not None:
            return self.haystack.blocks(self.seed)
        return filler_blocks(self.seed, self.filler)

    def _piece_of(self, piece: bytes, ids: np.ndarray) -> bytes:
        """The text of a block's first ``len(ids)`` tokens."""
        if self.tokenizer is None:
            return piece[:len(ids)]
        return self.tokenizer.decode(ids).encode()


class Haystack:
    """Real prose as the filler (the paper's repeated sentences test nothing a model meets in use): the text
    of some files, whitespace normalised and split into sentences. A prompt's blocks are consecutive
    sentences, SENTENCES_PER_BLOCK at a time, from a place its seed picks, cycling through the text."""

    SENTENCES_PER_BLOCK = 3

    def __init__(self, texts: list[str], name: str = "haystack"):
        sentences = []
        for text in texts:
            sentences += [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]
        if len(sentences) < 2 * self.SENTENCES_PER_BLOCK:
            raise BadInputError(f"{name}: {len(sentences)} sentence(s); a haystack needs at least "
                                f"{2 * self.SENTENCES_PER_BLOCK} (give longer text)")
        self.sentences, self.name = sentences, name

    @classmethod
    def from_files(cls, paths) -> "Haystack":
        texts = []
        for path in paths:   # the one text check (paths.py): random bytes are no haystack
            texts.append(b"".join(utf8_chunks(check_input_file(path, "--haystack"), "--haystack")).decode("utf-8"))
        return cls(texts, ", ".join(Path(p).name for p in paths))

    def blocks(self, seed: int) -> Iterator[bytes]:
        rng = random.Random(f"passkey-haystack/{seed}")
        n, k = len(self.sentences), self.SENTENCES_PER_BLOCK
        i = rng.randrange(n)
        while True:
            yield " ".join(self.sentences[(i + j) % n] for j in range(k)).encode()
            i = (i + k) % n


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


_CACHE: dict = {}


def _encode_cached(tokenizer, piece: bytes) -> np.ndarray:
    """Filler blocks repeat (the fixed filler is one block, the varied one a few thousand): encode each once."""
    key = (id(tokenizer), piece)
    if key not in _CACHE:
        if len(_CACHE) > 1 << 14:
            _CACHE.clear()
        _CACHE[key] = tokenizer.encode(piece)
    return _CACHE[key]


def _fixed_bytes(digits: int) -> int:
    """Intro, needle, question and their separating spaces."""
    return len(INTRO) + 1 + len(NEEDLE.format(key="0" * digits)) + 1 + len(QUESTION)


def filler_blocks(seed: int, filler: str = "varied") -> Iterator[bytes]:
    """The endless stream of filler blocks a prompt with this seed draws from."""
    if filler == "fixed":
        block = FILLER.encode()
        while True:
            yield block
    rng = random.Random(f"passkey-filler/{seed}")
    while True:
        yield " ".join(rng.sample(VARIED_SENTENCES, 5)).encode()


def filler_tokens(n: int, seed: int, filler: str = "varied", haystack: "Haystack | None" = None) -> np.ndarray:
    """Exactly ``n`` token ids (bytes) of filler alone (no intro, needle or question)."""
    buf, size = [], 0
    for block in (haystack.blocks(seed) if haystack is not None else filler_blocks(seed, filler)):
        buf.append(block + b" ")
        size += len(block) + 1
        if size >= n:   # raw bytes: a cut inside a UTF-8 character is still n byte tokens (not re-validated)
            return np.frombuffer(b"".join(buf)[:n], dtype=np.uint8).astype(np.int64)


def filler_ids(n: int, seed: int, filler: str = "varied", haystack: "Haystack | None" = None,
               tokenizer=None) -> np.ndarray:
    """Exactly ``n`` ids of filler in ``tokenizer`` (None: bytes, :func:`filler_tokens`)."""
    if tokenizer is None:
        return filler_tokens(n, seed, filler, haystack)
    buf, size = [], 0
    for block in (haystack.blocks(seed) if haystack is not None else filler_blocks(seed, filler)):
        ids = _encode_cached(tokenizer, b" " + block)
        buf.append(ids)
        size += len(ids)
        if size >= n:
            return np.concatenate(buf)[:n].astype(np.int64)
    raise AssertionError("filler blocks never end")


def needle_end(prompt: PasskeyPrompt) -> int:
    """Tokens from the prompt's start to the end of its needle."""
    needle, at = b" " + prompt._needle(), 0
    for piece, ids in prompt._layout():
        at += len(ids)
        if piece == needle:
            return at
    raise AssertionError("the prompt has no needle")
