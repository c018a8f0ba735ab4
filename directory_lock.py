"""One writer per directory, and outputs replaced as a whole.

`locked(directory)` holds an exclusive lock on a run or output directory for the life of a process: a second
process refuses at once, naming the holder. The lock is an flock on `directory/.lock`, which the kernel releases
when its process dies however it dies, so a stale lock is simply taken over.

`staged_replacement(target)` gives a hidden directory beside `target` to write new outputs into and swaps it with
`target` at the end (one atomic exchange where the filesystem has it), so a kill leaves either the complete old
outputs or the complete new ones, never a mixture.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utils import OutputError, UserError

LOCK_NAME = ".lock"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text(encoding="utf-8").strip()
    except OSError:
        return "another process"
    return f"process {text}" if text else "another process"


@contextlib.contextmanager
def locked(directory: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Hold `directory/.lock` (creating the directory) until the block ends; UserError if another process holds it."""
    directory = Path(directory)
    # the folders this call creates (the directory and missing parents), removed again if they stay empty
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK_NAME, "a+", encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot use {what} {directory} ({err.strerror}); choose another location") from err
    try:
        handle = _acquire(handle, directory / LOCK_NAME, directory, what)
        yield directory
    finally:
        if not handle.closed:  # ours: leave the directory as it was, then release
            with contextlib.suppress(OSError):
                (directory / LOCK_NAME).unlink()
            handle.close()
        for folder in created:  # a run that wrote nothing leaves no empty directory behind
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break


def _acquire(handle, lock_file: Path, directory: Path, what: str):
    """flock the open lock file; retried when its holder removed the file meanwhile (then we hold a stale inode)."""
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"{what} {directory} is in use by {_holder(lock_file)}; wait for it to finish, or choose "
                            "another directory") from None
        try:
            current = os.stat(lock_file).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
        handle = open(lock_file, "a+", encoding="utf-8")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} ({' '.join(Path(arg).name if i == 0 else arg for i, arg in enumerate(sys.argv))[:200]})")
    handle.flush()
    return handle


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def clean_leftovers(parent: Path, name: str) -> None:
    """Remove what a killed replacement of `parent/name` left: its staging and retired directories.

    A retired directory with no target means the kill fell between the two renames of the fallback swap: it is
    the complete old output, so it is put back.
    """
    target = parent / name
    for leftover in sorted(parent.glob(f"{RETIRED_PREFIX}{name}-*")):
        if not target.exists():
            os.rename(leftover, target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in parent.glob(f"{STAGING_PREFIX}{name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_replacement(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden directory beside `target`; when the block succeeds it replaces `target` as a whole.

    On an exception (or a kill) `target` is untouched and the staging directory is removed (or cleaned by the next
    run). The staging directory is locked while it is written, so it is already held when it becomes `target`.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(parent, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=parent))
    try:
        with locked(staging, "staging directory"):
            yield staging
            os.chmod(staging, 0o777 & ~_umask())
            swap_in(staging, target)
    except OutputError as err:  # name the file the user asked for, not its staging copy
        shutil.rmtree(staging, ignore_errors=True)
        if not err.path.is_relative_to(staging):
            raise
        raise OutputError(target / err.path.relative_to(staging), err.cause) from err.cause
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete directory `staging` in the place of `target` (one exchange where possible)."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old outputs
        return
    retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{target.name}-", dir=target.parent))
    os.rmdir(retired)
    os.rename(target, retired)  # a kill between these two renames is undone by clean_leftovers
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
