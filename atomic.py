"""Atomic outputs: a folder or file appears complete under its final name, or not at all.

Every writer of the project goes through here, so every command inherits the same rules:

- **One writer per output.** A lock beside the output (``.NAME.infini-lock``, ``flock``) is held while it
  is built; a second writer of the same output fails at once, naming the holder's pid, instead of both
  printing "wrote" and one result being silently lost.
- **Temporaries never outlive their writer.** The output is built beside its target
  (``.NAME.infini-tmp-PID-XXXX``) and removed on every exit the process survives (errors, Ctrl-C, and SIGTERM
  through the CLI's handler). A temporary of a killed run is stale by construction, since its writer held the
  lock the next writer now holds, and the next writer removes it.
- **A replace never deletes what it did not create.** An existing output is replaced only with ``force``,
  only when it is this writer's kind of output (``owned`` recognises it and lists its files) holding nothing
  else, and never the current directory or a folder above it. The old output is moved aside in one rename,
  the new one renamed into place, and only the old output's own files are deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from . import signals
from .errors import BadInputError
from .paths import check_output_path, relative_files

TEMP_TAG = ".infini-tmp-"
LOCK_TAG = ".infini-lock"
SHORT = 60     # characters of the output's name kept in its lock and temp names (NAME_MAX is 255 bytes)

Owned = Callable[[Path], "set[str] | None"]   # folder -> the relative file paths its writer owns, None: not ours

_held: set[str] = set()   # locks this process holds (a writer may nest another writer of the same output)


def _stem(target: Path) -> str:
    """``.NAME`` cut short, plus a digest of the whole name when it was cut (two long names never share)."""
    name = target.name
    if len(name) <= SHORT:
        return "." + name
    return f".{name[:SHORT]}~{hashlib.sha1(name.encode(errors='surrogateescape')).hexdigest()[:8]}"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the lock of ``target`` (a file or folder); BadInputError if another process holds it."""
    lock = target.parent / (_stem(target) + LOCK_TAG)
    key = str(lock.resolve())
    if key in _held:
        yield
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BadInputError(f"{target} is being written by another infini-deploy process (pid {holder}); "
                                "wait for it to finish or choose another output") from None
        try:   # the last holder unlinks the file as it releases: retry until we lock the file at that name
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale(target: Path) -> list[str]:
    """Remove the temporaries of earlier writers of ``target`` (call with its lock held); returns their names."""
    prefix = _stem(target) + TEMP_TAG
    removed = []
    for entry in target.parent.iterdir():
        if entry.name.startswith(prefix):
            _remove(entry)
            removed.append(entry.name)
    return removed


def _temp_prefix(target: Path) -> str:
    return f"{_stem(target)}{TEMP_TAG}{os.getpid()}-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_replaceable(out: Path, force: bool, owned: Owned | None, kind: str) -> None:
    """Refuse to replace ``out`` unless it is absent, an empty folder, or (with ``force``) our own output."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink():
        raise BadInputError(f"{out} is a symbolic link; refusing to replace it: give the folder it points to, or "
                            "a new name")
    if not out.is_dir():
        raise BadInputError(f"{out} is a file; expected a folder for the {kind} (remove it or choose another name)")
    files = relative_files(out)
    if not files and not any(out.iterdir()):
        return
    if not force:
        raise BadInputError(f"{out} exists; choose a new folder or pass --force to replace it")
    mine = owned(out) if owned else None
    if mine is None:
        article = "an" if kind[:1] in "aeiou" else "a"
        raise BadInputError(f"{out} is not {article} {kind} written by infini-deploy; --force replaces only its own "
                            "outputs: remove the folder yourself or choose another")
    foreign = sorted(set(files) - mine)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise BadInputError(f"{out} holds files infini-deploy did not write ({', '.join(foreign[:3])}{more}); "
                            "--force replaces only its own outputs: move them or choose another folder")


def remove_owned(folder: Path, owned: set[str]) -> list[str]:
    """Delete the files of ``folder`` named in ``owned``, then its emptied folders; returns what is left.
    Never follows a link: a link is removed itself, and nothing is reached through a linked folder."""
    for name in owned:
        path = folder / name
        if not _no_links_above(folder, path):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            try:
                (Path(root) / d).rmdir()
            except OSError:   # not empty (holds something we do not own), or a link
                pass
    left = relative_files(folder)
    if not left and not any(folder.iterdir()):
        folder.rmdir()
    return left


def _no_links_above(folder: Path, path: Path) -> bool:
    """No folder between ``folder`` and ``path`` is a symbolic link."""
    parent = path.parent
    while parent != folder and folder in parent.parents:
        if parent.is_symlink():
            return False
        parent = parent.parent
    return parent == folder


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, force: bool = False, owned: Owned | None = None,
                  kind: str = "output folder") -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir``; on success it takes the name ``out_dir`` in one rename.

    An existing non-empty ``out_dir`` is refused unless ``force``, and even then unless ``owned`` recognises
    it as this writer's output with nothing else in it. On any error (or KeyboardInterrupt) the temp folder
    is removed and ``out_dir`` is left as it was.
    """
    out = check_output_path(Path(out_dir), folder=True)
    with output_lock(out):
        remove_stale(out)
        check_replaceable(out, force, owned, kind)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; these folders are meant to be shared
            yield tmp
            signals.check()   # a signal whose exception was swallowed still stops the output here
            _commit_folder(tmp, out, force, owned, kind)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _commit_folder(tmp: Path, out: Path, force: bool, owned: Owned | None, kind: str) -> None:
    occupied = out.is_dir() and any(out.iterdir())
    if (occupied or out.is_file()) and not force:   # another program wrote there while we worked
        raise BadInputError(f"{out} appeared while the {kind} was being written; nothing was replaced: "
                            "remove it or choose another folder")
    check_replaceable(out, force, owned, kind)
    if not occupied:
        try:
            os.rename(tmp, out)   # replaces an absent or empty folder
        except OSError as e:
            raise BadInputError(f"{out} appeared while it was being written ({e.strerror}); nothing was "
                                "replaced: run again") from None
        return
    old = out.parent / f"{_temp_prefix(out)}old"
    os.rename(out, old)
    os.rename(tmp, out)
    left = remove_owned(old, owned(old) or set())
    for name in {Path(p).parts[0] for p in left}:   # written there in the instant before the rename: keep it
        if not (out / name).exists():
            os.rename(old / name, out / name)
    if old.exists() and relative_files(old):
        kept = out.parent / f"{out.name}.kept-{os.getpid()}"
        os.rename(old, kept)
        print(f"warning: files that appeared in {out} while it was replaced are kept in {kept}", file=sys.stderr)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp file path beside ``path``; on success it is flushed to disk and renamed over ``path``.

    An existing ``path`` is refused unless ``force``. On any error the temp file is removed and ``path`` is
    left as it was.
    """
    target = check_output_path(Path(path), folder=False)
    with output_lock(target):
        remove_stale(target)
        check_file_replaceable(target, force)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            tmp.chmod(0o666 & ~_umask())   # mkstemp makes it private; as a plain open() would
            if target.exists() and not force:
                raise BadInputError(f"{target} appeared while it was being written; nothing was replaced")
            check_file_replaceable(target, force)
            signals.check()
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def check_file_replaceable(target: Path, force: bool) -> None:
    """An existing file is replaced only with ``force``, and only if it is a regular file (never a link, a
    device such as /dev/null, a FIFO or a socket)."""
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_file():
        what = "a symbolic link" if target.is_symlink() else "not a regular file (a device, FIFO or socket)"
        raise BadInputError(f"{target} is {what}; refusing to replace it: give a new file name")
    if not force:
        raise BadInputError(f"{target} exists; choose a new file or pass --force to replace it")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_bytes(path: str | os.PathLike, data, force: bool = False) -> Path:
    """Write ``data`` (bytes-like) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, force) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    return write_bytes(path, text.encode("utf-8"), force)


@contextmanager
def scratch_folder(root: Path) -> Iterator[Path]:
    """A private working folder under ``root`` (``PID-XXXX``), removed on exit; the scratch folders of
    processes that no longer run (killed by SIGKILL) are removed first."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        pid = entry.name.split("-", 1)[0]
        if pid.isascii() and pid.isdigit() and not _alive(int(pid)):
            _remove(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
