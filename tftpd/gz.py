"""Derived files for the `.gz` lookup: `X.gz` made from `X`, or `X` from `X.gz`.

The FreeBSD loader asks for `X.gz` before `X` (and a boot tree holds one or the
other); answering either name from whichever exists saves a guess-and-retry round
per file. Each derived file is made once, in a cache directory shared by all
workers, named by the source's identity (device, inode, size, mtime), so a changed
source makes a new one. Two workers that want the same file take an flock: one
makes it, the other waits and then opens the finished file. A file is written to a
temporary name and renamed into place only when complete, so nobody ever opens a
half-written one. Everything goes through a directory descriptor opened before any
chroot, so the cache works in secure mode and is never inside the served root.

Making a file is the one long step a worker takes outside its loop (a large image
compresses at tens of MB/s), so it calls `beat` after every chunk, and while it waits
for another worker's lock: the master takes a worker that stops beating for hung.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import zlib
from collections.abc import Callable

CHUNK = 1 << 20
LOCK_POLL = 0.05  # s between tries for a lock another worker holds while it makes a file
GZIP_LEVEL = 6  # gzip's default; the file is made once and served many times


class DeriveError(Exception):
    """The derived file could not be made (a corrupt .gz, too large, disk full)."""


class GzCache:
    def __init__(self, dir_fd: int, max_bytes: int = 1 << 30,
                 max_expand: int = 1 << 30) -> None:
        self.dir_fd = dir_fd
        self.max_bytes = max_bytes  # the cache directory's bound
        self.max_expand = max_expand  # a decompressed file's bound (gzip bombs)
        self.made = 0  # files this worker made (the rest it found made)
        self.beat: Callable[[], None] = _alive  # set by each worker: its heartbeat

    @classmethod
    def open_dir(cls, path: str, **kw: int) -> GzCache:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), **kw)

    def derived(self, src_fd: int, ident: tuple, compress: bool) -> int:
        """An open descriptor of the derived file for the source open on src_fd."""
        name = "{:x}-{:x}-{}-{}".format(*ident) + (".gz" if compress else ".raw")
        fd = self._open(name)
        if fd >= 0:
            return fd
        lock = os.open(name + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600,
                       dir_fd=self.dir_fd)
        try:
            self._lock(lock)  # the other worker, if any, is making it
            fd = self._open(name)
            if fd >= 0:
                return fd
            self._make(name, src_fd, compress)
            self.made += 1
            fd = self._open(name)
            if fd < 0:
                raise DeriveError("derived file vanished")
            self._bound(name)
            return fd
        finally:
            try:
                os.unlink(name + ".lock", dir_fd=self.dir_fd)
            except OSError:
                pass
            os.close(lock)

    def _lock(self, fd: int) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.beat()
                time.sleep(LOCK_POLL)

    def _open(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return -1

    def _make(self, name: str, src_fd: int, compress: bool) -> None:
        tmp = f".{name}.{os.getpid()}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                      dir_fd=self.dir_fd)
        try:
            try:
                if compress:
                    self._compress(src_fd, out)
                else:
                    self._decompress(src_fd, out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException as err:
            try:
                os.unlink(tmp, dir_fd=self.dir_fd)
            except OSError:
                pass
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DeriveError("cache directory full") from None
            raise

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def _compress(self, src_fd: int, out: int) -> None:
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: a gzip wrapper
        off = 0
        while chunk := os.pread(src_fd, CHUNK, off):
            off += len(chunk)
            self._write(out, z.compress(chunk))
            self.beat()
        self._write(out, z.flush())

    def _decompress(self, src_fd: int, out: int) -> None:
        z = zlib.decompressobj(47)  # 32 + 15: gzip or zlib header, auto-detected
        off = total = 0
        try:
            while chunk := os.pread(src_fd, CHUNK, off):
                off += len(chunk)
                while chunk:
                    data = z.decompress(chunk, CHUNK)
                    total += len(data)
                    if total > self.max_expand:
                        raise DeriveError("decompressed file exceeds the size limit")
                    self._write(out, data)
                    chunk = z.unconsumed_tail
                    self.beat()
                if z.eof:
                    break
            if not z.eof:
                raise DeriveError("truncated .gz file")
        except zlib.error as err:
            raise DeriveError(f"corrupt .gz file: {err}") from None

    def _bound(self, keep: str) -> None:
        """Remove the oldest derived files while the cache exceeds its bound.

        Unlinking a file that transfers still read is safe: their descriptors keep
        the data until they close.
        """
        entries = []
        total = 0
        for name in os.listdir(self.dir_fd):
            if name.startswith(".") or name.endswith(".lock"):
                continue
            try:
                st = os.stat(name, dir_fd=self.dir_fd)
            except OSError:
                continue
            total += st.st_size
            entries.append((st.st_mtime_ns, name, st.st_size))
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                return
            if name == keep:
                continue
            try:
                os.unlink(name, dir_fd=self.dir_fd)
                total -= size
            except OSError:
                pass


def _alive() -> None:
    pass
