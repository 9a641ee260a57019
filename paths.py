"""Paths a user hands in, and paths read from the project's own files: checked once, here.

- :func:`inside`: a name read from a file (a manifest, a safetensors index, a graph's external data) resolves
  inside its folder, or IncompatibleArtifactError naming the file, the name and the folder (no ``..``, no
  absolute path, no symlink out of the folder);
- :func:`check_input_file` / :func:`check_output_path`: a user's path is what the command expects, with one
  line naming the path and the reason (a folder where a file is expected, a parent that is a file, a symlink
  loop, a name too long), before any long work starts;
- :func:`check_text_file` / :func:`utf8_chunks`: the one check of a text input (every option that takes a text
  file, and the streams that read one): UTF-8, or one line naming the option, the path and the first bad byte;
- :func:`parse_json` / :func:`read_json`: JSON that is not UTF-8, not JSON, nested too deeply or holding
  integers of thousands of digits is one IncompatibleArtifactError, never a raw exception.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
from pathlib import Path
from typing import Iterator

from .errors import BadInputError, IncompatibleArtifactError

NAME_MAX = 255          # bytes in one path component on Linux file systems
TEMP_SUFFIX_BYTES = 40  # what atomic.py adds to a (shortened) name: ".infini-tmp-PID-XXXXXXXX.tmp"
TEXT_SCAN = 1 << 16    # bytes of a streamed text file checked before the command starts (and per read)


def inside(folder: Path, name, source=None, root: Path | None = None) -> Path:
    """``folder / name`` after checking that it stays inside ``folder``: ``name`` was read from a file
    (``source``, for the message; default: the folder's manifest), so it may be hostile. Refused: a name that
    is not a non-empty string, an absolute path, ``..``, and a symlink that resolves out of ``root`` (default
    ``folder``; a Hugging Face cache snapshot links into its repository's blobs, one level up)."""
    where = source if source is not None else f"{folder}: its manifest"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IncompatibleArtifactError(f"{where} names {name!r} where a file name is expected: a relative path "
                                        f"that must stay inside {folder}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise IncompatibleArtifactError(f"{where} names {name!r}, a path outside the folder: every path it names "
                                        f"must stay inside {folder}; refusing to open it")
    path = Path(folder) / rel
    try:
        resolved, top = path.resolve(), Path(root if root is not None else folder).resolve()
    except (RuntimeError, OSError) as e:   # a symlink loop
        raise IncompatibleArtifactError(f"{path} cannot be resolved ({e})") from None
    if resolved != top and top not in resolved.parents:
        raise IncompatibleArtifactError(f"{where} names {name!r}, a link to {resolved}, outside the folder: every "
                                        f"path it names must stay inside {root or folder}; refusing to open it")
    return path


def describe_absent(path: Path) -> str:
    """Why ``path`` is not a readable file, in words: "is a folder", "is a symlink loop", "is missing"..."""
    path = Path(path)
    try:
        path.resolve(strict=False)
    except RuntimeError:
        return "is a symlink loop"
    if path.is_dir():
        return "is a folder, not a file"
    if path.is_symlink() and not path.exists():
        return "is a broken symlink"
    if path.exists() and not path.is_file():
        return "is not a regular file"
    return "is missing"


def relative_files(folder: Path) -> list[str]:
    """Every file (and symlink) under ``folder``, as sorted relative POSIX paths; links are not followed."""
    out = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        out += [(base / f).as_posix() for f in files]
        out += [(base / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def check_input_file(path, what: str = "input file") -> Path:
    """``path`` if it is a readable regular file; BadInputError saying exactly what it is otherwise."""
    path = Path(path)
    try:
        path.resolve(strict=False)
    except RuntimeError:
        raise BadInputError(f"{what} {path} is a symlink loop") from None
    if path.is_dir():
        raise BadInputError(f"{what} {path} is a folder; expected a file")
    if not path.exists():
        raise BadInputError(f"{what} {path} does not exist" + (" (a broken symlink)" if path.is_symlink() else ""))
    if not path.is_file():
        raise BadInputError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{what} {path} is not readable (permission denied)")
    return path


def check_text_file(path, what: str = "input file", scan: int | None = None, npy: bool = False) -> Path:
    """``path`` if it is a readable file of UTF-8 text; BadInputError naming ``what``, the path and the first bad
    byte otherwise (random bytes, a UTF-16 or Latin-1 file, a cut character). ``scan``: check only the first
    ``scan`` bytes, for a file that is streamed (the stream checks the rest through :func:`utf8_chunks`, with the
    same line); None: all of it. ``npy``: a ``.npy`` file of token ids is taken too (checked where it is read)."""
    path = check_input_file(path, what)
    if not (npy and path.suffix.lower() == ".npy"):
        for _ in utf8_chunks(path, what, limit=scan, npy=npy):
            pass
    return path


def utf8_chunks(path, what: str = "input file", chunk: int = TEXT_SCAN, limit: int | None = None,
                npy: bool = False) -> Iterator[bytes]:
    """The bytes of a text file, ``chunk`` at a time, each checked to be UTF-8 before it is given out: the one
    check of every text input. ``limit``: stop after that many bytes (a cut at the limit is not an error)."""
    check = codecs.getincrementaldecoder("utf-8")(errors="strict")
    hint = "give a UTF-8 text file" + (" or a .npy array of token ids" if npy else "")
    offset = 0
    with open(path, "rb") as f:
        while data := f.read(chunk if limit is None else min(chunk, limit - offset)):
            try:
                check.decode(data)
            except UnicodeDecodeError as e:
                raise BadInputError(f"{what} {path} is not UTF-8 text (bad byte at offset {offset + e.start}); "
                                    f"{hint}") from None
            offset += len(data)
            yield data
        if limit is not None and offset >= limit and f.read(1):
            return
    try:
        check.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BadInputError(f"{what} {path} ends inside a UTF-8 character; the file is truncated") from None


def check_output_path(path: Path, folder: bool, create: bool = True) -> Path:
    """``path`` after checking it can be written: its name fits, it is not the current directory or above it,
    and its parent is (or can be made) a writable folder. Creates missing parents when ``create``."""
    kind = "folder" if folder else "file"
    try:
        resolved, cwd = path.resolve(), Path.cwd().resolve()
    except RuntimeError:
        raise BadInputError(f"{path} is a symlink loop") from None
    if resolved == cwd or resolved in cwd.parents:
        raise BadInputError(f"{path} is the current directory or holds it; refusing to replace it: give a new "
                            f"{kind} name")
    if not path.name or path.name == "..":
        raise BadInputError(f"{path} names no {kind}; give a new {kind} name")
    if len(os.fsencode(path.name)) > NAME_MAX - TEMP_SUFFIX_BYTES:
        raise BadInputError(f"{path}: the name is {len(os.fsencode(path.name))} bytes; names of outputs must "
                            f"stay under {NAME_MAX - TEMP_SUFFIX_BYTES} bytes (the file system allows "
                            f"{NAME_MAX}, and a temporary name is made from it)")
    if not folder and path.is_dir():
        raise BadInputError(f"{path} is a folder; expected a file name")
    _make_parent(path, create)
    return path


def _make_parent(path: Path, create: bool) -> None:
    parent = path.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise BadInputError(f"cannot write {path}: {existing} is a file, not a folder")
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"cannot write {path}: cannot create {parent} ({e.strerror})") from None
        existing = parent
    if not os.access(existing, os.W_OK | os.X_OK):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise BadInputError(f"cannot write {path}: {existing} is on a read-only file system")
        raise BadInputError(f"cannot write {path}: {existing} is not writable (permission denied)")


def parse_json(text: str | bytes, where) -> object:
    """Parse JSON from a file we read; IncompatibleArtifactError for anything that is not plain JSON."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise IncompatibleArtifactError(f"{where} is not UTF-8 JSON (bad byte at offset {e.start}; "
                                            "a UTF-16 file?)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IncompatibleArtifactError(f"{where} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise IncompatibleArtifactError(f"{where} is nested too deeply to be a valid file") from None
    except ValueError as e:   # integers over Python's digit limit
        raise IncompatibleArtifactError(f"{where} is not valid JSON ({e})") from None


def read_json(path: Path, what: str = "file") -> object:
    """``parse_json`` of a file's bytes; BadInputError when the file cannot be read."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise BadInputError(f"{what} {path} is a folder; expected a JSON file") from None
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise BadInputError(f"{what} {path} does not exist") from None
        raise BadInputError(f"cannot read {what} {path} ({e.strerror})") from None
    return parse_json(data, path)


def cache_root() -> Path:
    """$INFINI_CACHE, else $XDG_CACHE_HOME/infini-deploy, else ~/.cache/infini-deploy."""
    if os.environ.get("INFINI_CACHE"):
        return Path(os.environ["INFINI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "infini-deploy"
