"""A pass-through FUSE filesystem that turns read-only, and writable again, while files of it
are open for writing: the read-only database of ``tests/test_disk_process.py``.

Run as ``python tests/read_only_fs.py BACKING MOUNTPOINT FLAG`` (root, foreground): every
file under ``MOUNTPOINT`` is the file of the same name under ``BACKING``. While the file
``FLAG`` exists (it lives outside the mount; the test creates and removes it), every call that
would change the filesystem fails with ``EROFS``, as on a read-only mount: ``write``,
``fsync``, ``truncate``, opening for writing, creating, removing, renaming, changing modes,
owners or times. Reads keep working. Removing ``FLAG`` makes the same open descriptors
writable again.

Why not the kernel's own read-only mount: Linux refuses ``mount -o remount,ro`` (and a
read-only bind remount, and ``mount_setattr(MOUNT_ATTR_RDONLY)``) with ``EBUSY`` while any
file of the filesystem is open for writing, which a running switch's database always is;
``chattr +i`` on a tmpfs file refuses new opens for writing but not writes through
descriptors already open; and the one way the kernel does turn a filesystem read-only under
writers (ext4 ``errors=remount-ro`` after an error) aborts its journal and refuses
``remount,rw`` until it is unmounted, which the same open files prevent, so nothing could be
seen recovering. Here the switch's own descriptors get ``EROFS`` from the same system calls,
and get it no more once the flag is gone.

What does not live here: the test (``test_disk_process.py``), locks (not implemented, so the
kernel keeps POSIX locks itself, as SQLite needs), anything about the switch.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

from fuse import FUSE, FuseOSError, Operations

#: ``open`` flags that ask for writing.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class ReadOnlyWhenFlagged(Operations):  # type: ignore[misc]  # fusepy is untyped
    """Loopback of ``backing``; ``EROFS`` for every change while ``flag`` exists."""

    use_ns = True
    #: No extended attributes: libfuse answers ENOSYS, after which the kernel stops asking
    #: for ``security.capability`` before every write.
    getxattr = None
    listxattr = None
    setxattr = None
    removexattr = None

    def __init__(self, backing: str, flag: str) -> None:
        self.backing = os.path.realpath(backing)
        self.flag = flag

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _writable(self) -> None:
        if os.path.exists(self.flag):
            raise FuseOSError(errno.EROFS)

    # -- reads ---------------------------------------------------------------------------------

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")
        attrs: dict[str, Any] = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            attrs[k] = getattr(st, k + "_ns")
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        out: dict[str, Any] = {k: getattr(st, k) for k in keys}
        out.update(f_flag=st.f_flag, f_frsize=st.f_frsize, f_namemax=st.f_namemax)
        return out

    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            self._writable()
        return os.open(self._path(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    # -- changes -------------------------------------------------------------------------------

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._writable()
        return os.pwrite(fh, data, offset)

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._writable()
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._writable()
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._writable()
        # Read-write whatever the caller asked: the kernel reads pages of a shared mapping
        # (SQLite's -shm) through this handle too.
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def unlink(self, path: str) -> None:
        self._writable()
        os.unlink(self._path(path))

    def rename(self, old: str, new: str) -> None:
        self._writable()
        os.rename(self._path(old), self._path(new))

    def mkdir(self, path: str, mode: int) -> None:
        self._writable()
        os.mkdir(self._path(path), mode)

    def rmdir(self, path: str) -> None:
        self._writable()
        os.rmdir(self._path(path))

    def chmod(self, path: str, mode: int) -> None:
        self._writable()
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._writable()
        os.chown(self._path(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        self._writable()
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=times)


def main(argv: list[str]) -> int:
    backing, mountpoint, flag = argv
    logging.basicConfig(level=logging.WARNING)  # fusepy's own errors, to the daemon's log
    FUSE(
        ReadOnlyWhenFlagged(backing, flag),
        mountpoint,
        foreground=True,
        big_writes=True,
        fsname="cardswitch-rofs",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
