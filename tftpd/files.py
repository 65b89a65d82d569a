"""Client filename -> an open file under the root, or a TFTP error.

Paths are checked by components, never by string prefix. The file is opened first
and everything after is decided on its descriptor (`fstat`, and where it really is
through /proc/self/fd), so a symlink swapped in between a check and the open cannot
lead outside the root.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from tftpd import packet as P
from tftpd.gz import DeriveError, GzCache

MAX_NAME = 1024  # bytes; longer names are refused, not truncated
MAX_COMPONENT = 255  # NAME_MAX
MAX_NETASCII = 64 << 20  # netascii is converted in memory; bigger files are refused


class FileError(Exception):
    """A request that cannot be served; carries the TFTP error to answer with."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or message


@dataclass(slots=True)
class OpenFile:
    """An open file ready to serve: the descriptor the data path reads from."""

    fd: int
    size: int  # bytes the client will receive (after netascii conversion)
    path: str  # relative to the root, for logs
    ident: tuple = ()  # identity() of the file as opened (a derived file's: + a tag)
    release: Callable[[], None] | None = None  # a shared descriptor: give it back
    image: bytes | None = None  # its `size` bytes, read once when it was opened

    @property
    def derived(self) -> bool:
        """Made from another file (`.gz` both ways): its identity is the source's."""
        return bool(self.ident) and isinstance(self.ident[-1], str)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.release is not None:
            self.release()
        else:
            os.close(self.fd)
        self.fd = -1


_SAFE = bytes(b for b in range(0x20, 0x7F) if b != 0x5C)  # printable, no backslash
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def sanitize(raw: bytes | str, limit: int = 120) -> str:
    """A client string made safe for one log line: printable ASCII, escapes, bounded."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1", "replace")
    cut = raw[:limit]
    if not cut.translate(None, _SAFE):  # the usual case: nothing to escape
        out = cut.decode("ascii")
    else:
        out = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}"
                      for b in cut)
    return out + ("..." if len(raw) > limit else "")


def normalize(filename: bytes, root: str) -> str:
    """The path of `filename` relative to `root`, or FileError.

    `\\` becomes `/` (Windows boxen); a leading `/` means the root, and an absolute
    name that spells out the root itself (`/tftpboot/x` with root /tftpboot, as the
    FreeBSD loader asks) is taken relative to it. `..` is refused, never resolved, and
    so is a name ending in `/` (a directory's: `x.txt/` is not `x.txt`).
    """
    # Legacy PXE ROMs have been seen to end the filename with a 0xFF byte.
    name = filename.rstrip(b"\xff")
    if len(name) > MAX_NAME:
        raise FileError(P.E_ACCESS, "Access violation", "filename too long")
    if _CONTROL.search(name):
        raise FileError(P.E_ACCESS, "Access violation", "control byte in filename")
    text = os.fsdecode(name.replace(b"\\", b"/"))
    if text.endswith(("/", "/.")):  # a directory's name: no file is served by it
        raise FileError(P.E_ACCESS, "Access violation", "filename ends in '/'")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if text.startswith("/"):
        root_parts = [p for p in root.split("/") if p]
        if root_parts and parts[: len(root_parts)] == root_parts:
            parts = parts[len(root_parts):]
    for part in parts:
        if part == "..":
            raise FileError(P.E_ACCESS, "Access violation", "'..' in filename")
        if len(os.fsencode(part)) > MAX_COMPONENT:
            raise FileError(P.E_ACCESS, "Access violation", "filename component too long")
    if not parts:
        raise FileError(P.E_ACCESS, "Access violation", "filename names the root")
    return "/".join(parts)


def _errno_to_tftp(err: OSError) -> FileError:
    # One place maps errno to a TFTP error (tftp-hpa's nak()).
    if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
        return FileError(P.E_NOT_FOUND, "File not found", os.strerror(err.errno))
    if err.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return FileError(P.E_ACCESS, "Access violation", os.strerror(err.errno))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileError(P.E_DISK_FULL, "Disk full or allocation exceeded")
    return FileError(P.E_UNDEFINED, "Cannot open file", os.strerror(err.errno or 0))


def _netascii(fd: int, size: int) -> tuple[int, int]:
    """Convert to netascii (LF -> CR LF, CR -> CR NUL) into a memfd; (fd, new size)."""
    if size > MAX_NETASCII:
        raise FileError(P.E_UNDEFINED, "File too large for netascii mode")
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise FileError(P.E_UNDEFINED, "File changed while reading")
    converted = data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    mfd = os.memfd_create("tftpd-netascii", os.MFD_CLOEXEC)
    view = memoryview(converted)
    while view:
        view = view[os.write(mfd, view):]
    return mfd, len(converted)


class Root:
    """The served directory. `real` is its resolved path; confinement compares to it."""

    def __init__(self, path: str, chrooted: bool = False) -> None:
        self.path = path
        self.real = os.path.realpath(path)
        self.chrooted = chrooted

    def _inside(self, fd: int) -> bool:
        if self.chrooted:
            return True  # after chroot(2) nothing outside the root is reachable
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        return os.path.commonpath([where, self.real]) == self.real

    def open_read(self, filename: bytes, mode: str = "octet") -> OpenFile:
        rel = normalize(filename, self.real)
        try:
            fd = os.open(os.path.join(self.real, rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
                         | os.O_NONBLOCK)
        except OSError as err:
            raise _errno_to_tftp(err) from None
        try:
            if not self._inside(fd):
                raise FileError(P.E_ACCESS, "Access violation", "path leads outside the root")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileError(P.E_ACCESS, "Access violation", "not a regular file")
            size = st.st_size
            ident = identity(st)
            if mode == "netascii":
                mfd, size = _netascii(fd, size)
                os.close(fd)
                fd = mfd
            return OpenFile(fd, size, rel, ident)
        except BaseException:
            os.close(fd)
            raise


def _image(fd: int, size: int) -> bytes | None:
    """The file's `size` bytes, or None if it changed while being read (a file
    rewritten in place: then its blocks are read from the descriptor as they go)."""
    try:
        before = os.fstat(fd)
        parts, off = [], 0
        while off < size:
            chunk = os.pread(fd, min(size - off, 1 << 20), off)
            if not chunk:
                return None
            parts.append(chunk)
            off += len(chunk)
        after = os.fstat(fd)
    except OSError:
        return None
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) \
            or after.st_size < size:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


Identity = tuple[int, int, int, int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """What says a file is still the one we opened, with the rights it had then: a
    replaced or rewritten file changes its inode, size or mtime; a change of mode or
    owner (a permission revoked) changes those and the ctime. C's tftpd_dir_holds
    compares the same fields (struct tftpd_known_answer)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
            st.st_uid, st.st_gid)


def dir_identity(path: str) -> Identity | None:
    """The identity of a directory, None when it is missing: what says a name that
    was missing there still is (an entry added or removed changes its mtime)."""
    try:
        return identity(os.stat(path))
    except OSError:
        return None


@dataclass(slots=True, eq=False)
class _Shared:
    fd: int
    size: int
    ident: tuple
    refs: int = 0
    current: bool = True  # still what the cache hands out for its name
    image: bytes | None = None


@dataclass(slots=True)
class _Miss:
    expires: float
    parent: tuple | None  # the directory's identity when the name was missing


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    opens: int = 0
    miss_hits: int = 0  # misses answered from the negative cache


class FileCache:
    """One open descriptor per file per worker, shared by all its transfers.

    A thousand clients reading nbp.efi cost one open. Each request checks the name
    with one stat(): a file replaced or rewritten on disk has a new identity and is
    opened afresh, while transfers already running keep the descriptor they started
    with (a replaced file is served whole, old or new). Names that do not exist are
    remembered for `miss_ttl` seconds, or until their directory changes, so loaders
    that guess (`.gz`, pxelinux.cfg/01-<mac>) cost no open.
    """

    def __init__(self, root: Root, *, max_open: int = 256, miss_ttl: float = 2.0,
                 max_misses: int = 4096, clock: Callable[[], float] = time.monotonic,
                 gz: GzCache | None = None, image_max: int = 8 << 20,
                 image_budget: int = 32 << 20) -> None:
        self.root = root
        self.gz = gz  # set: `.gz` lookup both ways
        self.max_open = max_open
        self.miss_ttl = miss_ttl
        self.max_misses = max_misses
        self.clock = clock
        self._open: dict[tuple[str, str], _Shared] = {}
        self._misses: dict[str, _Miss] = {}
        self.stats = CacheStats()
        # The last open() that failed on a missing name, while the negative cache
        # holds it: (expires, the directory, its identity or None), else None.
        self.last_miss: tuple[float, str, tuple | None] | None = None
        self._rel: dict[bytes, tuple[str, str]] = {}  # normalize() and the path, remembered
        # Images: a file of up to image_max bytes is read once into memory when it is
        # opened, and its blocks are sent from there (no pread per block); the
        # current images of a worker hold image_budget bytes at most.
        self.image_max = image_max
        self.image_budget = image_budget
        self._image_bytes = 0

    def path_of(self, filename: bytes) -> str | None:
        """The path a name opened last resolved to (None if it was not opened)."""
        known = self._rel.get(filename)
        return known[1] if known is not None else None

    def open(self, filename: bytes, mode: str = "octet") -> OpenFile:
        self.last_miss = None
        known = self._rel.get(filename)
        if known is None:
            rel = normalize(filename, self.root.real)  # pure functions of the name
            known = (rel, os.path.join(self.root.real, rel))
            if len(self._rel) >= 4096:
                self._rel.clear()
            self._rel[filename] = known
        rel, path = known
        miss = self._misses.get(rel)
        if miss is not None:
            if miss.expires > self.clock() and miss.parent == self._parent(path):
                self.stats.miss_hits += 1
                self.last_miss = (miss.expires, os.path.dirname(path), miss.parent)
                raise FileError(P.E_NOT_FOUND, "File not found", "No such file (cached)")
            del self._misses[rel]
        try:
            st = os.stat(path)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                if self.gz is not None:
                    derived = self._open_derived(rel, mode)
                    if derived is not None:
                        return derived
                self._remember_miss(rel, path)
                if not os.path.isdir(self.root.real):
                    # Renamed or removed while serving: say so, not just "not found".
                    raise FileError(P.E_NOT_FOUND, "File not found",
                                    f"the root {self.root.real} is missing") from None
            raise _errno_to_tftp(err) from None
        key = (rel, mode)
        shared = self._open.get(key)
        if shared is not None and shared.ident == identity(st):
            self.stats.hits += 1
            self._open[key] = self._open.pop(key)  # most recently used last
            return self._lend(shared, rel)
        f = self.root.open_read(filename, mode)  # the checks, on the new descriptor
        return self._install(key, shared, _Shared(f.fd, f.size, f.ident), rel)

    def _open_derived(self, rel: str, mode: str) -> OpenFile | None:
        """`X.gz` from `X`, or `X` from `X.gz`, when only the other exists."""
        assert self.gz is not None
        compress = rel.endswith(".gz")
        alt = rel[:-3] if compress else rel + ".gz"
        if not alt or alt.endswith("/"):
            return None
        try:
            st = os.stat(os.path.join(self.root.real, alt))
        except OSError:
            return None
        key = (rel, mode)
        ident = (*identity(st), "gz" if compress else "gunzip")
        shared = self._open.get(key)
        if shared is not None and shared.ident == ident:
            self.stats.hits += 1
            return self._lend(shared, rel)
        src = self.root.open_read(os.fsencode(alt))  # confinement, on the source
        try:
            try:
                fd = self.gz.derived(src.fd, src.ident, compress)
            except DeriveError as err:
                raise FileError(P.E_UNDEFINED, "Cannot derive file", str(err)) from None
        finally:
            src.close()
        try:
            size = os.fstat(fd).st_size
            if mode == "netascii":
                mfd, size = _netascii(fd, size)
                os.close(fd)
                fd = mfd
        except BaseException:
            os.close(fd)
            raise
        return self._install(key, shared, _Shared(fd, size, (*src.ident, ident[-1])), rel)

    def _install(self, key: tuple[str, str], stale: _Shared | None, fresh: _Shared,
                 rel: str) -> OpenFile:
        """A newly opened file becomes the one handed out for `key`."""
        self.stats.opens += 1
        if stale is not None:
            self._retire(stale)
            del self._open[key]
        if fresh.size <= self.image_max and self._image_bytes + fresh.size <= self.image_budget:
            fresh.image = _image(fresh.fd, fresh.size)
            if fresh.image is not None:
                self._image_bytes += fresh.size
        self._open[key] = fresh
        self._evict()
        return self._lend(fresh, rel)

    def close(self) -> None:
        for shared in self._open.values():
            self._retire(shared)
        self._open.clear()

    def _lend(self, shared: _Shared, rel: str) -> OpenFile:
        shared.refs += 1

        def release() -> None:
            shared.refs -= 1
            if shared.refs == 0 and not shared.current:
                os.close(shared.fd)

        return OpenFile(shared.fd, shared.size, rel, shared.ident, release, shared.image)

    def _retire(self, shared: _Shared) -> None:
        shared.current = False
        if shared.image is not None:  # the transfers that lent it keep theirs
            self._image_bytes -= len(shared.image)
            shared.image = None
        if shared.refs == 0:
            os.close(shared.fd)

    def _evict(self) -> None:
        if len(self._open) <= self.max_open:
            return
        for key in [k for k, v in self._open.items() if v.refs == 0]:
            self._retire(self._open.pop(key))
            if len(self._open) <= self.max_open:
                return

    def _parent(self, path: str) -> tuple | None:
        return dir_identity(os.path.dirname(path))

    def _remember_miss(self, rel: str, path: str) -> None:
        if len(self._misses) >= self.max_misses:
            del self._misses[next(iter(self._misses))]  # the oldest
        miss = self._misses[rel] = _Miss(self.clock() + self.miss_ttl, self._parent(path))
        self.last_miss = (miss.expires, os.path.dirname(path), miss.parent)


# -- uploads ---------------------------------------------------------------------------

_PROC_FD = "/proc/self/fd"


@dataclass(slots=True)
class Upload:
    """An upload in progress: a file with no name (O_TMPFILE) or a hidden temporary
    one, beside its target, given the target's name only once it is complete."""

    dir_fd: int
    name: str  # the target's name in its directory
    fd: int
    tmp_name: str | None  # None: an O_TMPFILE, which nothing can see or leave behind
    rel: str
    overwrite: bool  # the target existed and may be replaced
    committed: bool = False

    def write(self, offset: int, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def commit(self) -> None:
        """Put the file in place; raises FileError if that is no longer allowed."""
        os.fsync(self.fd)
        try:
            if self.tmp_name is None:
                # linkat() through /proc gives the anonymous file a name.
                src = f"{_PROC_FD}/{self.fd}"
                if not self.overwrite:
                    os.link(src, self.name, dst_dir_fd=self.dir_fd, follow_symlinks=True)
                else:
                    self.tmp_name = f".{self.name}.tftpd-{os.getpid()}.part"
                    os.link(src, self.tmp_name, dst_dir_fd=self.dir_fd, follow_symlinks=True)
            if self.tmp_name is not None:
                if not self.overwrite:
                    # link() fails if the name appeared meanwhile; rename() would not.
                    os.link(self.tmp_name, self.name, src_dir_fd=self.dir_fd,
                            dst_dir_fd=self.dir_fd)
                    os.unlink(self.tmp_name, dir_fd=self.dir_fd)
                else:
                    os.rename(self.tmp_name, self.name, src_dir_fd=self.dir_fd,
                              dst_dir_fd=self.dir_fd)
                self.tmp_name = None
        except FileExistsError:
            raise FileError(P.E_EXISTS, "File already exists") from None
        except OSError as err:
            raise _errno_to_tftp(err) from None
        self.committed = True

    def discard(self) -> None:
        """Close; an upload that did not complete leaves nothing behind."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp_name is not None:
            try:
                os.unlink(self.tmp_name, dir_fd=self.dir_fd)
            except OSError:
                pass
            self.tmp_name = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def open_upload(root: Root, filename: bytes, *, create: bool, permissive: bool,
                umask: int) -> Upload:
    """Check a WRQ's target (in.tftpd's rules) and open its temporary file.

    A new file needs --create. An existing one is replaced only if it is a regular
    file writable by everyone (as in.tftpd asks) or with --permissive; never through a
    symlink. The directory must exist under the root.
    """
    rel = normalize(filename, root.real)
    parent, _, name = rel.rpartition("/")
    try:
        dfd = os.open(os.path.join(root.real, parent), os.O_RDONLY | os.O_DIRECTORY
                      | os.O_CLOEXEC)
    except OSError as err:
        raise _errno_to_tftp(err) from None
    try:
        if not root._inside(dfd):
            raise FileError(P.E_ACCESS, "Access violation", "path leads outside the root")
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None:
            if not create:
                raise FileError(P.E_NOT_FOUND, "File not found", "no --create")
        elif not stat.S_ISREG(st.st_mode):
            raise FileError(P.E_ACCESS, "Access violation", "target is not a regular file")
        elif not permissive and not st.st_mode & stat.S_IWOTH:
            raise FileError(P.E_EXISTS, "File already exists", "target not world-writable")
        mode = 0o666 & ~umask
        fd, tmp = -1, None
        if not root.chrooted and os.path.isdir(_PROC_FD):
            try:
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=dfd)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise _errno_to_tftp(err) from None
        if fd < 0:
            tmp = f".{name}.tftpd-{os.getpid()}-{os.urandom(4).hex()}.part"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                             dir_fd=dfd)
            except OSError as err:
                raise _errno_to_tftp(err) from None
        os.fchmod(fd, mode)  # the umask of the process must not narrow it further
        return Upload(dfd, name, fd, tmp, rel, st is not None)
    except BaseException:
        os.close(dfd)
        raise
