"""Byte-level tokenizer: token i < 256 is the byte i of UTF-8 text; four special tokens follow.

No vocabulary file, no merges, nothing to download: any text round-trips, and a
model's vocabulary is ``VOCAB_SIZE`` = 260.
"""

from __future__ import annotations

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
