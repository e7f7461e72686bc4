"""Writing folders so that a user's data is never lost: build in a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (and the folders) to disk before the folder is put in place."""
    for path in sorted(root.rglob("*")) + [root]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. folders on platforms that cannot open them
            continue
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)


def replace_folder(dest: str | Path, build: Callable[[Path], object]) -> Path:
    """Write folder ``dest`` atomically: ``build(path)`` writes into a temporary sibling named like
    ``dest``; only when it has finished (and is flushed to disk) does it replace ``dest``.

    If ``build`` fails or the process dies while building, ``dest`` is untouched and the partial
    folder is a hidden ``.NAME.tmp-*`` sibling (removed on failure). An existing ``dest`` is moved
    aside (``.NAME.old-*``) just before the rename and deleted after it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    staged = work / dest.name
    try:
        build(staged)
        if not staged.is_dir():
            raise RuntimeError(f"{dest}: nothing was written")
        _fsync_tree(staged)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(staged, dest)
    shutil.rmtree(work, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
