"""Tokenizers: the byte-level one of the presets, and a checkpoint's own (models/hf_tokenizer.py).

Byte level: token i < 256 is the byte i of UTF-8 text; four special tokens follow.
No vocabulary file, no merges, nothing to download: any text round-trips, and a
model's vocabulary is ``VOCAB_SIZE`` = 260. The module-level ``encode``/``decode``
are that tokenizer; :class:`ByteTokenizer` wraps them in the interface every
tokenizer has, so nothing outside this file needs to know a byte id:

    encode(text) -> int64 ids          decode(ids) -> text
    start_ids                          ids a stream starts with (the checkpoint's BOS, if it adds one)
    stop_ids                           ids that end generation (EOS and its kin)
    decoder()                          incremental detokenizer: .step(id) -> text, .end() -> text
    encode_stream(byte chunks)         a file's text, chunk by chunk, in bounded memory
    chat(messages) -> text             the chat template (None where the tokenizer has none)
    save(folder)                       the files that describe it (none for bytes)

:func:`load_tokenizer` picks the one a checkpoint folder carries.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import BadInputError

BOS, EOS, PAD, SEP = 256, 257, 258, 259
SPECIAL = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, "<sep>": SEP}
VOCAB_SIZE = 260


def encode(text: str | bytes, bos: bool = False) -> np.ndarray:
    """Text (str, or bytes that must be UTF-8) -> int64 token ids."""
    if isinstance(text, str):
        data = text.encode("utf-8")
    else:
        data = bytes(text)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInputError(f"input is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                                "give a UTF-8 file or a .npy token file") from None
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    return np.concatenate([[BOS], ids]).astype(np.int64) if bos else ids


def decode(ids, errors: str = "replace") -> str:
    """Token ids -> text. Special tokens are dropped; bytes that do not form UTF-8 are replaced."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors=errors)


class ByteDecoder:
    """Incremental detokenizer for bytes: a character split over tokens appears once it is complete."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token: int) -> str:
        return self._utf8.decode(bytes([token])) if 0 <= token < 256 else ""

    def end(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    """The presets' tokenizer (see the module docstring); stateless."""

    kind = "bytes"
    vocab_size = VOCAB_SIZE
    start_ids: tuple[int, ...] = ()      # the presets were trained without a BOS at the stream start
    stop_ids: tuple[int, ...] = (EOS,)
    chat_template = None

    def encode(self, text: str | bytes) -> np.ndarray:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)

    def decoder(self) -> ByteDecoder:
        return ByteDecoder()

    def encode_stream(self, chunks: Iterable[bytes]) -> Iterator[np.ndarray]:
        """UTF-8 byte chunks (already checked) -> their ids, one array per chunk."""
        for data in chunks:
            yield np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        raise BadInputError("this model has the byte-level tokenizer and no chat template; --chat needs a "
                            "checkpoint with one (e.g. from `infini convert`)")

    def save(self, folder: Path) -> list[str]:
        return []

    def check_vocabulary(self, vocab_size: int, where: str) -> None:
        if vocab_size < VOCAB_SIZE:
            raise BadInputError(f"{where}: the model's vocabulary has {vocab_size} ids, fewer than the byte-level "
                                f"tokenizer's {VOCAB_SIZE}, and there is no tokenizer.json next to it")


def load_tokenizer(folder: str | os.PathLike | None, vocab_size: int | None = None):
    """The tokenizer a checkpoint folder carries (tokenizer.json), else the byte-level one.

    ``vocab_size``: the model's; a tokenizer with ids outside it is refused (BadInputError).
    """
    from .hf_tokenizer import TOKENIZER_FILE, HFTokenizer

    if folder is not None and (Path(folder) / TOKENIZER_FILE).is_file():
        tokenizer = HFTokenizer.load(folder)
    else:
        tokenizer = ByteTokenizer()
    if vocab_size is not None:
        tokenizer.check_vocabulary(vocab_size, str(folder))
    return tokenizer
