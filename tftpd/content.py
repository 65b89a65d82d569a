"""A client's name -> what to serve it: the one seam TFTP and HTTP share.

Confinement, the `.gz` lookup, per-client roots (--root-per-client) and the content
hook (--content-hook) live here, so both protocols answer a name alike. The caller
has applied the remap rules; this module takes their result.

Without a hook a name resolves at once (begin() returns a Resolution). With one,
begin() returns a PendingContent whose future completes in another thread; the
caller arranges to be woken (future.add_done_callback) and then calls complete() in
its own thread, where the FileCache is touched.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tftpd import packet as P
from tftpd.files import (
    MAX_NETASCII,
    FileCache,
    FileError,
    OpenFile,
    identity,
    normalize,
    sanitize,
)
from tftpd.hook import ContentHook, HookTimeout, hook_search_path
from tftpd.logs import Throttle
from tftpd.neighbours import ClientRoots, NeighbourCache, load_netlink, plain_ip

if TYPE_CHECKING:
    from tftpd.config import Config
    from tftpd.files import Root
    from tftpd.gz import GzCache

log = logging.getLogger("tftpd")

# Log lines about hook failures, per resolver and 10 s: clients can cause them.
HOOK_LOGS_PER_ADDRESS = 2
HOOK_LOGS_TOTAL = 20
_SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL) \
    if hasattr(fcntl, "F_ADD_SEALS") else 0
_SERIAL = itertools.count(1)  # tells the hook's answers apart (their identities)


@dataclass(frozen=True, slots=True)
class ContentRequest:
    """What the content hook is called with."""

    client: tuple[str, int]  # (ip, port); IPv4-mapped IPv6 shown as plain IPv4
    filename: str  # after remap and normalize(), relative to the root
    protocol: str  # "tftp" | "http"
    mac: str | None  # "aa:bb:cc:dd:ee:ff" from the kernel's neighbour table, else None
    options: dict[str, str] = field(default_factory=dict)  # TFTP options asked; {} for HTTP
    mode: str = "octet"  # TFTP transfer mode ("octet" | "netascii"); "octet" for HTTP


@dataclass(slots=True)
class Resolution:
    """The answer: exactly one of `file` and `error` is set."""

    file: OpenFile | None
    error: FileError | None
    http_status: int  # 200 for a file; 404 miss, 403 refusal, 500 hook failed, 504 timeout

    @classmethod
    def serve(cls, f: OpenFile) -> Resolution:
        return cls(f, None, 200)

    @classmethod
    def refuse(cls, err: FileError, status: int | None = None) -> Resolution:
        return cls(None, err, status if status is not None else http_status(err))


@dataclass(slots=True, eq=False)
class PendingContent:
    """A request waiting for the content hook; complete() turns it into a Resolution."""

    request: ContentRequest
    mode: str
    prefixes: list[str]  # per-client directories, tried before the root
    future: Future
    started: float = 0.0  # time.monotonic() at begin()


def http_status(err: FileError) -> int:
    """The HTTP status of a TFTP refusal."""
    if err.code == P.E_NOT_FOUND:
        return 404
    if err.code == P.E_ACCESS:
        return 403
    return 500


HOOK_FAILED = "content hook failed"
HOOK_TIMED_OUT = "content hook timed out"


def memory_file(data: bytes, path: str, mode: str = "octet", image_max: int = 8 << 20) \
        -> OpenFile:
    """An OpenFile over an anonymous file holding `data` (a memfd, sealed where the
    kernel can): pread() and sendfile() read it like any file. Its identity is its
    own, shared with no other answer; in netascii mode the bytes are converted."""
    if mode == "netascii":
        if len(data) > MAX_NETASCII:
            raise FileError(P.E_UNDEFINED, "File too large for netascii mode")
        data = data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if _SEALS else 0)
    fd = os.memfd_create("tftpd-hook", flags)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if _SEALS:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            except OSError:
                pass  # sealing is a safeguard, not a need
        ident = (*identity(os.fstat(fd)), next(_SERIAL))
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, len(data), path, ident, None,
                    bytes(data) if len(data) <= image_max else None)


class ContentResolver:
    """Names to files for one loop thread (it owns `cache`, which is not thread-safe).

    `hook` may be shared by the threads of a worker; `neighbours` gives the hook its
    MACs (by default the one `roots` uses, else one of its own when there is a hook).
    """

    def __init__(self, cache: FileCache, *, hook: ContentHook | None = None,
                 roots: ClientRoots | None = None, neighbours: NeighbourCache | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.hook = hook
        self.roots = roots
        if neighbours is None and roots is not None:
            neighbours = roots.neighbours
        if neighbours is None and hook is not None:
            neighbours = NeighbourCache()
        self.neighbours = neighbours
        self.clock = clock
        self.failures = Throttle("content hook failures", HOOK_LOGS_PER_ADDRESS,
                                 HOOK_LOGS_TOTAL)
        self.hook_failed = 0  # counters, for metrics
        self.hook_timed_out = 0

    @property
    def per_client(self) -> bool:
        """True when answers depend on the client (a hook, per-client roots): answers
        remembered by the request's bytes alone (C's known answers) must not be used."""
        return self.hook is not None or self.roots is not None

    def begin(self, filename: bytes, mode: str, client: tuple[str, int], protocol: str,
              options: dict[str, str]) -> Resolution | PendingContent:
        """Start resolving a (remapped) name asked by `client`."""
        if self.hook is None and self.roots is None:
            try:  # the cache remembers what normalize() made of each name
                return Resolution.serve(self.cache.open(filename, mode))
            except FileError as err:
                return Resolution.refuse(err)
        try:
            rel = normalize(filename, self.cache.root.real)
        except FileError as err:
            return Resolution.refuse(err)  # refused names never reach the hook
        ip = plain_ip(client[0])
        prefixes = self.roots.prefixes(ip) if self.roots is not None else []
        if self.hook is None:
            return self._from_roots(rel, mode, prefixes)
        mac = self.neighbours.mac(ip) if self.neighbours is not None else None
        req = ContentRequest((ip, client[1]), rel, protocol, mac, dict(options), mode)
        return PendingContent(req, mode, prefixes, self.hook.submit(req), self.clock())

    def complete(self, pending: PendingContent) -> Resolution:
        """The hook's outcome as a Resolution; call once its future is done."""
        fut = pending.future
        if not fut.done():
            raise ValueError("complete() before the content hook answered")
        req = pending.request
        err = fut.exception()
        if isinstance(err, HookTimeout):
            self.hook_timed_out += 1
            self._log(req, "%s", err)
            return Resolution.refuse(FileError(P.E_UNDEFINED, HOOK_TIMED_OUT, str(err)), 504)
        if err is not None:
            return self._failed(req, err)
        value = fut.result()
        if value is None:
            return self._from_roots(req.filename, pending.mode, pending.prefixes)
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                return Resolution.serve(memory_file(bytes(value), req.filename, pending.mode,
                                                    self.cache.image_max))
            except FileError as ferr:
                return Resolution.refuse(ferr)
            except OSError as oerr:
                return self._failed(req, oerr)
        if isinstance(value, (str, os.PathLike)):
            return self._from_path(req, os.fspath(value), pending.mode)
        return self._failed(req, TypeError(
            f"returned a {type(value).__name__}, not None, bytes or a path"))

    def _from_path(self, req: ContentRequest, path: str | bytes, mode: str) -> Resolution:
        """A path the hook chose: judged like a client's name (normalized, confined to
        the root, relative to it; a leading / means the root), per-client roots aside."""
        name = os.fsencode(path)
        try:
            rel = normalize(name, self.cache.root.real)
            return Resolution.serve(self.cache.open(os.fsencode(rel), mode))
        except FileError as err:
            if err.code == P.E_ACCESS:
                self._log(req, "returned %s: %s", sanitize(name), err.reason)
            return Resolution.refuse(err)

    def _from_roots(self, rel: str, mode: str, prefixes: list[str]) -> Resolution:
        """ROOT/<prefix>/NAME for each per-client prefix, then ROOT/NAME. Only a miss
        moves on: a per-client file that is refused is not replaced by the shared one."""
        for prefix in prefixes:
            try:
                return Resolution.serve(self.cache.open(os.fsencode(f"{prefix}/{rel}"), mode))
            except FileError as err:
                if err.code != P.E_NOT_FOUND:
                    return Resolution.refuse(err)
        try:
            return Resolution.serve(self.cache.open(os.fsencode(rel), mode))
        except FileError as err:
            return Resolution.refuse(err)

    def _failed(self, req: ContentRequest, err: BaseException) -> Resolution:
        self.hook_failed += 1
        if self.failures.allow(req.client[0], self.clock()):
            log.error("content hook failed for %s asking %s: %s: %s", req.client[0],
                      sanitize(req.filename), type(err).__name__, sanitize(str(err), 300),
                      exc_info=err if err.__traceback__ is not None else None)
        return Resolution.refuse(FileError(P.E_UNDEFINED, HOOK_FAILED,
                                           f"{type(err).__name__}: {err}"), 500)

    def _log(self, req: ContentRequest, fmt: str, *args: object) -> None:
        if self.failures.allow(req.client[0], self.clock()):
            log.warning("content hook, %s asking %s: " + fmt, req.client[0],
                        sanitize(req.filename), *args)



# -- what a worker resolves names with ---------------------------------------------------


def needs_netlink(cfg: Config) -> bool:
    """Whether the settings ask for MACs (per-client roots by MAC, or a hook, whose
    requests carry one)."""
    return cfg.root_per_client == "mac" or bool(cfg.content_hook)


def prepare_master(cfg: Config, chroot: bool) -> None:
    """In the master, before any chroot: import what MAC lookups need (pyroute2 is not
    reachable inside a chroot). Before a chroot always, for a reload may ask for MACs."""
    if chroot or needs_netlink(cfg):
        load_netlink()


@dataclass(slots=True, eq=False)
class WorkerContent:
    """What one worker's threads resolve names with. The hook and the neighbour cache
    are shared (both thread-safe); each thread makes its own resolver()."""

    root: Root
    gz: GzCache | None = None
    hook: ContentHook | None = None
    neighbours: NeighbourCache | None = None
    roots: ClientRoots | None = None

    @property
    def per_client(self) -> bool:
        """Answers depend on the client: C's known answers must stay off."""
        return self.hook is not None or self.roots is not None

    def resolver(self, cache: FileCache | None = None) -> ContentResolver:
        """A resolver for one thread, over `cache` (default: a FileCache of its own)."""
        if cache is None:
            cache = FileCache(self.root, gz=self.gz)
        return ContentResolver(cache, hook=self.hook, roots=self.roots,
                               neighbours=self.neighbours)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()
        if self.neighbours is not None:
            self.neighbours.close()


def build_for_worker(cfg: Config, root: Root, gz: GzCache | None = None) -> WorkerContent:
    """The content settings made real, in a worker after it dropped privileges (the
    hook's module is loaded here, and runs as the worker's user)."""
    content = WorkerContent(root, gz)
    if not cfg.content_hook and not cfg.root_per_client:
        return content
    content.neighbours = NeighbourCache()
    if cfg.root_per_client:
        content.roots = ClientRoots(cfg.root_per_client, content.neighbours)
    if cfg.content_hook:
        # With uploads on, a module under the root could be a client's: refused.
        content.hook = ContentHook(cfg.content_hook, cfg.content_hook_timeout,
                                   hook_search_path(cfg.config),
                                   forbid=root.real if cfg.create else None)
    return content
