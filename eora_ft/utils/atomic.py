"""Writers that readers (and a rerun after a crash) see whole or not at all.

A file is written to a temp sibling, flushed, and renamed over its target. A directory (a compressed
model, an adapter) is filled as a temp sibling and *exchanged* with the old one in one ``renameat2``
call (Linux's ``RENAME_EXCHANGE``), so a process killed at any instant leaves the old directory or the
new one under the target's name, never neither. A full disk is reported as :class:`DiskFullError`,
naming what was being written and saying the previous version is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(OSError):
    """The disk (or quota) filled while writing ``path``; the previous version of ``path`` is intact."""


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """``0o666`` minus the umask: what ``open()`` would give (``mkstemp`` gives 0600)."""
    return 0o666 & ~current_umask()


def raise_if_disk_full(err: OSError, path: Path, what: str) -> None:
    """Raise :class:`DiskFullError` naming ``what`` and ``path`` if ``err`` says the disk filled (callers
    re-raise ``err`` itself otherwise)."""
    if err.errno in _NO_SPACE:
        raise DiskFullError(err.errno, f"no space left on the device while writing {what} {path}: nothing was "
                                       f"replaced (the previous {path.name}, if any, is intact); free space there "
                                       "or write elsewhere (output_dir / cache_dir / $EORA_FT_CACHE)") from err


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not reach the disk before the bytes do
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as err:
        raise_if_disk_full(err, path, "file")
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); False where the OS or file
    system cannot (the caller falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"exchanging {first} and {second}: {os.strerror(code)}")


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, replaceable: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a sibling temp dir to fill; on success swap it in for ``directory``, on failure delete it.

    An existing ``directory`` is replaced only after the new one is complete, and only if it is empty
    or ``replaceable`` (a previous output of the same writer): a typo must not wipe a real directory.
    Temp siblings left by a killed writer (``.<name>.tmp-*``) are removed first.
    """
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and (not any(directory.iterdir()) or replaceable(directory))):
        raise FileExistsError(f"refusing to replace {directory}: it exists and is not an empty directory or a {what}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the output should get the usual permissions
    try:
        try:
            yield tmp
        except OSError as err:
            raise_if_disk_full(err, directory, what)
            raise
        if not directory.exists():
            os.replace(tmp, directory)
        elif not exchange(tmp, directory):  # after the exchange tmp holds the old directory
            old = directory.with_name(f".{directory.name}.tmp-old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)  # rename(2) cannot replace a non-empty directory: move it aside first
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
