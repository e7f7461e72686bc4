"""Writing folders so that a user's data is never lost: build in a temporary sibling, then rename;
and write failures the user can act on (disk full, quota, read-only or forbidden destination)
reported as one line naming the destination (:class:`WriteError`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

#: errnos of a write that failed for a reason the user can fix: a full disk, an exceeded quota, a
#: read-only file system, a destination the user may not write
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})

#: a file system with less free space than this after a failed write is taken to be full
FULL_BELOW_BYTES = 1 << 20


class WriteError(OSError):
    """Writing ``path`` failed for a reason the user can act on (an errno of :data:`WRITE_ERRNOS`).

    ``str()`` is one line: ``cannot write PATH: REASON (NOTE)``; the note says what is still intact.
    """

    def __init__(self, path: str | os.PathLike, code: int, note: str | None = None):
        super().__init__(code, os.strerror(code), str(path))
        self.note = note

    def __str__(self) -> str:
        line = f"cannot write {self.filename}: {self.strerror}"
        return f"{line} ({self.note})" if self.note else line


def _filesystem_problem(path: str | os.PathLike) -> int | None:
    """``EROFS`` if ``path`` (or its nearest existing parent) is on a read-only file system,
    ``ENOSPC`` if that file system has less than :data:`FULL_BELOW_BYTES` free, else ``None``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < FULL_BELOW_BYTES:
        return errno.ENOSPC
    return None


def write_failure(exc: BaseException, path: str | os.PathLike | None = None) -> int | None:
    """The errno (one of :data:`WRITE_ERRNOS`) if ``exc`` is a failed write the user can act on, else ``None``.

    Recognised: an ``OSError`` with such an errno; an error of a writer that reports the OS error in
    its message (safetensors: ``... (os error 28)``, torch: ``errno 28``); and torch's own archive
    writer, whose errors say nothing of the cause (``unexpected pos ...``), when ``path`` lies on a
    read-only or full file system. Other errors, other ``OSError`` s included, are not write failures.
    """
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in WRITE_ERRNOS else None
    if not isinstance(exc, Exception):
        return None
    text = str(exc)
    for match in re.finditer(r"(?:os error|errno) (\d+)", text, flags=re.IGNORECASE):
        if int(match.group(1)) in WRITE_ERRNOS:
            return int(match.group(1))
    if path is not None and isinstance(exc, RuntimeError) and re.search(r"PytorchStreamWriter|inline_container|file write failed", text):
        return _filesystem_problem(path)
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, note: str | Callable[[], str | None] | None = None) -> Iterator[None]:
    """Inside the block, a write failure the user can act on (:func:`write_failure`) becomes a
    :class:`WriteError` naming ``path`` (the destination the user knows, not a temporary file),
    with ``note`` (or what ``note()`` returns) saying what is intact. Other errors pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        code = write_failure(e, path)
        if code is None:
            raise
        raise WriteError(path, code, note() if callable(note) else note) from e


def write_json(path: str | os.PathLike, obj: object, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` (parents made) through a temporary sibling renamed into place, so
    ``path`` holds the complete file or what it held before; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (and the folders) to disk before the folder is put in place
    (or a checkpoint is marked complete). A flush that fails for want of space, or with an I/O
    error, raises: what it vouches for is not on disk."""
    for path in sorted(root.rglob("*")) + [root]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. folders on platforms that cannot open them
            continue
        try:
            os.fsync(fd)
        except OSError as e:  # pragma: no cover - folders that cannot be flushed (EINVAL) are fine
            if e.errno in WRITE_ERRNOS | {errno.EIO}:
                raise
        finally:
            os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the C library or the file system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover_folder(dest: str | Path) -> None:
    """Clean up after a :func:`replace_folder` of ``dest`` that a killed process left unfinished:
    a previous ``dest`` moved aside (``.NAME.old-*``) goes back into place if ``dest`` is missing
    (a kill between the two renames of the fallback path), then the hidden ``.NAME.old-*`` and
    partial ``.NAME.tmp-*`` siblings are deleted. Nothing else is touched."""
    dest = Path(dest)
    for old in sorted(dest.parent.glob(f".{dest.name}.old-*")):
        if not (dest.exists() or dest.is_symlink()) and (old / dest.name).exists():
            os.replace(old / dest.name, dest)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(dest: str | Path, build: Callable[[Path], object]) -> Path:
    """Write folder ``dest`` atomically: ``build(path)`` writes into a temporary sibling named like
    ``dest``; only when it has finished (and is flushed to disk) does it replace ``dest``.

    If ``build`` fails or the process dies while building, ``dest`` is untouched and the partial
    folder is a hidden ``.NAME.tmp-*`` sibling (removed on failure, or by the next call for the same
    ``dest``: :func:`recover_folder`; so two processes must not write the same ``dest`` at once).
    An existing ``dest`` is swapped with the new folder in one step where the system can
    (``renameat2``), else moved aside (``.NAME.old-*``) just before the rename and deleted after it.
    A full disk, a read-only or forbidden destination is a :class:`WriteError` naming ``dest``.
    """
    dest = Path(dest)
    recover_folder(dest)
    existed = dest.exists() or dest.is_symlink()
    with writing(dest, "the previous folder is unchanged" if existed else None):
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        staged = work / dest.name
        try:
            build(staged)
            if not staged.is_dir():
                raise RuntimeError(f"{dest}: nothing was written")
            fsync_tree(staged)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    if existed and _exchange(staged, dest):
        fsync_dir(dest.parent)
        shutil.rmtree(work, ignore_errors=True)  # the previous folder, now in the temporary sibling
        return dest
    old = None
    if existed:
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(staged, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(work, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
