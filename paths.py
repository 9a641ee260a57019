"""Paths a user hands in, and paths read from the project's own files: checked once, here.

- :func:`inside`: a name read from a manifest, snapshot or config resolves inside its folder, or
  IncompatibleArtifactError (no ``..``, no absolute path, no symlink out of the folder);
- :func:`check_input_file` / :func:`check_output_path`: a user's path is what the command expects, with one
  line naming the path and the reason (a folder where a file is expected, a parent that is a file, a symlink
  loop, a name too long), before any long work starts;
- :func:`parse_json` / :func:`read_json`: JSON that is not UTF-8, not JSON, nested too deeply or holding
  integers of thousands of digits is one IncompatibleArtifactError, never a raw exception.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .errors import BadInputError, IncompatibleArtifactError

NAME_MAX = 255          # bytes in one path component on Linux file systems
TEMP_SUFFIX_BYTES = 40  # what atomic.py adds to a (shortened) name: ".infini-tmp-PID-XXXXXXXX.tmp"


def inside(folder: Path, name) -> Path:
    """``folder / name`` after checking that it stays inside ``folder`` (``name`` comes from a file we read)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IncompatibleArtifactError(f"{folder}: a file name in its manifest is {name!r}; expected a "
                                        "relative path inside the folder")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise IncompatibleArtifactError(f"{folder}: its manifest names {name!r}, a path outside the folder; "
                                        "refusing to open it")
    path = Path(folder) / rel
    try:
        resolved, root = path.resolve(), Path(folder).resolve()
    except (RuntimeError, OSError) as e:   # a symlink loop
        raise IncompatibleArtifactError(f"{path} cannot be resolved ({e})") from None
    if resolved != root and root not in resolved.parents:
        raise IncompatibleArtifactError(f"{path} is a link to {resolved}, outside {folder}; refusing to open it")
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
