"""Writing a file so that a crash, a kill or a full disk never leaves a damaged one.

The new contents go to a temporary file in the target's folder, named
``.<target>.parambounds-<pid>.tmp``, which is renamed over the target once complete and
synced. The target's owner and group are kept where the user may set them (as
``sed -i`` does). An interrupted run (even ``kill -9``) leaves at most that temporary file, which
no user would take for the checkpoint; the next write to the same target removes the
ones whose process is gone. The target's mode is kept; a symlink is written through (the
link stays, its target changes); a file with several hard links is refused, since the
other links would keep the old contents, and so is a read-only file.

Two runs that replace one target at once would each read the old contents and the last
rename would win, losing the other's changes: :func:`lock_target` takes an exclusive
``flock`` on the target (a file, or a DCP checkpoint's folder) for the whole run, and a
second run refuses at once instead of waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import BoundsError

__all__ = ["atomic_write", "lock_target", "resolve_target", "stale_temp_files"]

_TAG = ".parambounds-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_files(target: Path) -> list[Path]:
    """Temporary files of earlier writes to ``target`` whose process is gone."""
    prefix = f".{target.name}{_TAG}"
    found = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            pid = name[len(prefix) : -len(".tmp")]
            if pid.isdigit() and not _alive(int(pid)):
                found.append(target.parent / name)
    return found


@contextlib.contextmanager
def lock_target(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (when it exists) while the block runs.

    The lock is on the file (or folder) that ``target`` names when it is taken; a run
    that replaced it in the meantime is noticed (the name then names another inode) and
    the new one is locked instead.

    Raises:
        BoundsError: when another run holds the lock.
    """
    for _ in range(100):
        try:
            fd = os.open(target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            yield  # nothing to lose yet: the rename of a new file is atomic
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BoundsError(
                    f"{target}: another run is writing it (it is locked); nothing was "
                    "changed: run again once that one has finished"
                ) from None
            mine, now = os.fstat(fd), None
            with contextlib.suppress(OSError):
                now = os.stat(target)
            if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                yield
                return
        finally:
            os.close(fd)  # releases the lock
    raise BoundsError(f"{target}: keeps being replaced by another run; nothing was changed")


def resolve_target(target: Path) -> Path:
    """The file to replace: through symlinks; refused with several hard links, or read-only.

    Raises:
        BoundsError: for an empty path, a directory, a missing folder, hard links, or a
            read-only file.
    """
    if str(target) == "":
        raise BoundsError("the output path is empty")
    real = Path(os.path.realpath(target))
    if real.is_dir() and (real / ".metadata").is_file():
        return real  # a sharded (DCP) checkpoint: _dcp.save_dcp replaces it whole
    if real.is_dir():
        raise BoundsError(f"{target}: is a directory")
    if not real.parent.is_dir():
        raise BoundsError(f"{target}: folder {real.parent} does not exist")
    if real.exists():
        if not real.is_file():
            raise BoundsError(f"{target}: not a regular file")
        info = real.stat()
        if not info.st_mode & 0o222:  # like rm and cp, a write-protected file is kept
            raise BoundsError(
                f"{target}: is read-only (mode {stat.S_IMODE(info.st_mode):o}); refusing to "
                "replace it (make it writable first, or write the copy elsewhere with -o)"
            )
        links = info.st_nlink
        if links > 1:
            raise BoundsError(
                f"{target}: has {links} hard links; replacing it would leave the other "
                "links with the old contents (write the copy elsewhere with -o)"
            )
    return real


def atomic_write(target: Path, write: Callable[[Path], None], mode_from: Path | None) -> None:
    """Write ``target`` through a temporary file in its folder, then rename it into place.

    Raises:
        BoundsError: naming the target when the write fails (a full disk, ...).
    """
    for old in stale_temp_files(target):
        old.unlink(missing_ok=True)
    tmp = target.parent / f".{target.name}{_TAG}{os.getpid()}.tmp"
    try:
        write(tmp)
        if mode_from is not None and mode_from.exists():
            info = mode_from.stat()
            if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                try:  # keep the owner where we may, as sed -i does (before the mode:
                    os.chown(tmp, info.st_uid, info.st_gid)  # chown clears setuid bits)
                except PermissionError:
                    with contextlib.suppress(PermissionError):  # at least the group
                        os.chown(tmp, -1, info.st_gid)
            os.chmod(tmp, stat.S_IMODE(info.st_mode))
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            detail = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
            raise BoundsError(f"{target}: cannot write: {detail}") from None
        raise
