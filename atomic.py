"""Atomic writes: a folder or file appears complete under its final name, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInputError


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, force: bool = False):
    """Yield a temp folder next to ``out_dir``; on success it replaces ``out_dir`` by rename.

    An existing ``out_dir`` is refused unless ``force``. On any error the temp folder is
    removed and ``out_dir`` is left as it was.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise BadInputError(f"{out} exists; choose a new folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; these folders are meant to be shared
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
