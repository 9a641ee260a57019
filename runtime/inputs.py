"""Token sources: a text or token file read in chunks, so any length streams in bounded memory."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BadInputError
from ..paths import check_input_file, utf8_chunks

CHUNK = 1 << 16  # tokens (bytes, for text) read per chunk


def count_tokens(path: str | os.PathLike, tokenizer=None) -> int | None:
    """Tokens in a file without reading it: bytes for text (byte-level tokenizer), elements for .npy;
    None for text under a real tokenizer (only encoding it would tell)."""
    path = check_input_file(path)
    if path.suffix.lower() == ".npy":
        return int(_load_npy(path).shape[0])
    if tokenizer is not None and tokenizer.kind != "bytes":
        return None
    return path.stat().st_size


def iter_tokens(path: str | os.PathLike, limit: int | None = None, chunk: int = CHUNK,
                tokenizer=None) -> Iterator[np.ndarray]:
    """Yield int64 chunks of a file's tokens; with ``limit``, exactly that many, cycling the file.

    A ``.npy`` file holds a 1-D integer array of token ids; any other file is UTF-8 text, encoded
    by ``tokenizer`` (models/tokenizer.py; default: bytes) in chunks, with the tokenizer's
    ``start_ids`` (e.g. BOS) before every pass over the file.
    """
    path = check_input_file(path)
    if count_tokens(path) == 0:
        raise BadInputError(f"input file {path} is empty; expected text or a .npy token array")
    remaining = limit
    while remaining is None or remaining > 0:
        for piece in (_iter_npy(path, chunk) if path.suffix.lower() == ".npy" else _iter_text(path, chunk, tokenizer)):
            if remaining is not None:
                piece = piece[:remaining]
                remaining -= len(piece)
            yield piece
            if remaining == 0:
                return
        if remaining is None:
            return


def _load_npy(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise BadInputError(f"input file {path} is empty (0 bytes); expected a .npy array of token ids")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise BadInputError(f"{path} is not a .npy file (no NumPy header); give a .npy array of token ids, or "
                                "a text file under another name")
    try:
        with warnings.catch_warnings():   # a header declaring an absurd shape warns before it fails
            warnings.simplefilter("ignore")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise BadInputError(f"{path} is not a plain .npy array ({str(e).strip()[:80] or type(e).__name__})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; expected 1-D integer token ids")
    return arr


def _iter_npy(path: Path, chunk: int) -> Iterator[np.ndarray]:
    arr = _load_npy(path)
    for start in range(0, arr.shape[0], chunk):
        piece = np.asarray(arr[start:start + chunk])
        if piece.dtype.kind == "u" and piece.size and int(piece.max()) > np.iinfo(np.int64).max:
            raise BadInputError(f"{path} holds id {int(piece.max())}, which is no token id (above 2^63 - 1)")
        yield piece.astype(np.int64)  # a copy: the map is read-only


def _iter_text(path: Path, chunk: int, tokenizer=None) -> Iterator[np.ndarray]:
    if tokenizer is None or tokenizer.kind == "bytes":
        yield from _iter_utf8(path, chunk)
        return
    if tokenizer.start_ids:
        yield np.asarray(tokenizer.start_ids, dtype=np.int64)
    for ids in tokenizer.encode_stream(_iter_utf8(path, chunk, raw=True)):
        for start in range(0, len(ids), chunk):
            yield ids[start:start + chunk]


def _iter_utf8(path: Path, chunk: int, raw: bool = False) -> Iterator[np.ndarray | bytes]:
    """The file's bytes, checked to be UTF-8 (paths.utf8_chunks), as uint8 ids (or the raw bytes with ``raw``)."""
    for data in utf8_chunks(path, chunk=chunk, npy=True):
        yield data if raw else np.frombuffer(data, dtype=np.uint8).astype(np.int64)
