"""A FUSE file system that stalls on demand, for tests of what a hung shared file system does to a run.

A passthrough (fusepy over libfuse2) of a backing folder: every operation goes to that folder, except that a write or
an fsync waits while the file STALL exists in the backing folder (outside the mount), as a hard-mounted NFS or a
parallel file system client whose server stopped answering. The waiting is the kernel's: the writing thread sleeps
uninterruptibly in the FUSE request the daemon has taken, which is the real path a stalled save takes (an injected
`time.sleep` in the writer is a wait a thread can leave; this one is not).

    with stalling_mount(tmp_path) as (mount, stall):
        ...                      # use `mount` as a file system
        stall.touch()            # writes and fsyncs block from now on
        stall.unlink()           # they go on

Run as a script: `python stalling_fs.py BACKING MOUNT` serves until unmounted. Needs root (a FUSE mount) and libfuse2,
which `stalling_mount` installs with apt-get when it is missing, as tools/local-slurm.sh does for SLURM.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import subprocess
import sys
import time
from pathlib import Path

STALL = "STALL"


def ensure_libfuse() -> None:
    from support.apt import apt_install  # (here: this file also runs as the daemon's script, without `support`)

    if ctypes.util.find_library("fuse") is None:
        apt_install("libfuse2", "fuse")


@contextlib.contextmanager
def stalling_mount(tmp_path: Path):
    """(the mount point, the STALL flag) of a stalling FUSE file system over tmp_path/backing; unmounted after."""
    ensure_libfuse()
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    mount.mkdir()
    daemon = subprocess.Popen([sys.executable, __file__, str(backing), str(mount)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not os.path.ismount(mount):
            if daemon.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the FUSE file system did not mount: {daemon.communicate()[0][-2000:]}")
            time.sleep(0.05)
        yield mount, backing / STALL
    finally:
        (backing / STALL).unlink(missing_ok=True)  # a blocked writer goes on, so nothing stays in state D
        subprocess.run(["fusermount", "-u", "-z", str(mount)], capture_output=True, timeout=30)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()


def serve(backing: str, mount: str) -> None:
    from fuse import FUSE, FuseOSError, Operations

    class Passthrough(Operations):
        def __init__(self, root: str):
            self.root = root

        def _path(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _wait_while_stalled(self) -> None:
            while os.path.exists(os.path.join(self.root, STALL)):
                time.sleep(0.1)

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._path(path))
            except OSError as error:
                raise FuseOSError(error.errno) from None
            return {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                                       "st_nlink", "st_size", "st_uid")}

        def access(self, path, mode):
            if not os.access(self._path(path), mode):
                raise FuseOSError(13)

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def readlink(self, path):
            return os.readlink(self._path(path))

        def symlink(self, target, source):
            os.symlink(source, self._path(target))

        def link(self, target, source):
            os.link(self._path(source), self._path(target))

        def mkdir(self, path, mode):
            os.mkdir(self._path(path), mode)

        def rmdir(self, path):
            os.rmdir(self._path(path))

        def unlink(self, path):
            os.unlink(self._path(path))

        def rename(self, old, new):
            os.rename(self._path(old), self._path(new))

        def chmod(self, path, mode):
            os.chmod(self._path(path), mode)

        def chown(self, path, uid, gid):
            os.chown(self._path(path), uid, gid)

        def utimens(self, path, times=None):
            os.utime(self._path(path), times)

        def truncate(self, path, length, fh=None):
            os.truncate(self._path(path), length)

        def open(self, path, flags):
            return os.open(self._path(path), flags)

        def create(self, path, mode, fi=None):
            return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def write(self, path, data, offset, fh):
            self._wait_while_stalled()
            return os.pwrite(fh, data, offset)

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            os.close(fh)
            return 0

        def fsync(self, path, datasync, fh):
            self._wait_while_stalled()
            os.fsync(fh)
            return 0

        def fsyncdir(self, path, datasync, fh):
            self._wait_while_stalled()
            return 0

        def statfs(self, path):
            st = os.statvfs(self._path(path))
            return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                       "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    FUSE(Passthrough(backing), mount, foreground=True, nothreads=False, allow_other=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
