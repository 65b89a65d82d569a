"""The master: bind, drop privileges, prefork the pool, supervise it.

Shaped after gunicorn's Arbiter: signal handlers only queue the signal; the main
loop dispatches `handle_<name>`. The master stays single-threaded (a process with
threads that forks can deadlock) and never serves a request itself.

Listen sockets: one SO_REUSEPORT socket per worker slot and address. The kernel
hashes a client's address and port to one socket, so a retransmitted RRQ lands on
the worker already serving it and is merged there, never served twice. The master
keeps each slot's sockets, so a replacement worker takes over the very socket (and
the requests queued on it) of the worker it replaces.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import resource
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from tftpd.config import Address, Config
from tftpd.datapath import DataPath
from tftpd.files import Root
from tftpd.gz import GzCache
from tftpd.stats import Stats
from tftpd.worker import (
    EXIT_BOOT_FAILED,
    MASTER_SIGNALS,
    Listener,
    Worker,
    enable_pktinfo,
    wants_pktinfo,
)

log = logging.getLogger("tftpd")

# A storm of RRQs arrives faster than a worker turns its loop; every peer measured
# here lost requests to a full listen buffer at 500 clients. 8 MiB holds ~25,000
# queued RRQs. As root SO_RCVBUFFORCE passes net.core.rmem_max.
LISTEN_RCVBUF = 8 << 20
RESPAWN_WINDOW = 5.0  # s: deaths within this of a start count as a crash loop
MAX_BACKOFF = 30.0


class StartupError(Exception):
    """The server cannot start; the message is for a person."""


@dataclass(slots=True)
class Slot:
    index: int
    sockets: list[socket.socket]
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    respawn_at: float = 0.0


@dataclass(slots=True)
class Master:
    cfg: Config
    datapath: DataPath
    slots: list[Slot] = field(default_factory=list)
    bound: list[str] = field(default_factory=list)
    root: Root | None = None
    signals: list[int] = field(default_factory=list)
    stopping: str = ""  # "", "drain" or "now"
    stats: Stats | None = None
    gz: GzCache | None = None
    _wake_r: int = -1

    # -- startup ---------------------------------------------------------------------

    def bind(self) -> None:
        addresses = self.cfg.addresses or (Address(socket.AF_INET, "0.0.0.0", 69),)
        self.slots = [Slot(i, []) for i in range(self.cfg.workers)]
        self.stats = Stats(self.cfg.workers)
        for addr in addresses:
            port = _claim_port(addr)
            for slot in self.slots:
                sock = _listen_socket(addr, port)
                slot.sockets.append(sock)
            self.bound.append(str(Address(addr.family, addr.host, port)))

    def prepare(self) -> None:
        """After binding, before forking: limits, chroot, privileges."""
        _raise_nofile()
        root = os.path.abspath(self.cfg.root)
        if not os.path.isdir(root):
            raise StartupError(f"root {root!r} is not a directory")
        chrooted = False
        if self.cfg.gz:
            # Opened before chroot (the cache is never inside the served root) and
            # handed to the new user, so workers can write to it.
            path = self.cfg.gz_cache or default_gz_cache()
            try:
                self.gz = GzCache.open_dir(path, max_bytes=self.cfg.gz_cache_mb << 20)
            except OSError as err:
                raise StartupError(f"--gz-cache {path}: {err.strerror}") from None
            if self.cfg.user:
                try:
                    pw = pwd.getpwnam(self.cfg.user)
                    os.chown(self.gz.dir_fd, pw.pw_uid, pw.pw_gid)
                except (KeyError, OSError):
                    pass
        if self.cfg.secure and os.geteuid() == 0:
            os.chroot(root)
            os.chdir("/")
            root, chrooted = "/", True
        if self.cfg.user:
            _drop_privileges(self.cfg.user)
        elif os.geteuid() == 0:
            log.warning("running as root; use -u USER to drop privileges after binding")
        self.root = Root(root, chrooted=chrooted)

    # -- supervision -----------------------------------------------------------------

    def install_signals(self) -> None:
        """Before the ready line: a TERM sent the moment we say we listen is handled."""
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self._queue_signal)

    def run(self) -> int:
        if self._wake_r < 0:
            self.install_signals()
        for slot in self.slots:
            self.spawn_worker(slot)
        deadline = float("inf")
        while True:
            self._handle_signals()
            self.reap_workers()
            now = time.monotonic()
            if self.stopping:
                alive = [s for s in self.slots if s.pid]
                if not alive:
                    if self.stats:
                        log.info("stopped; totals: %s", self.stats.summary())
                    return 0
                if self.stopping == "drain" and deadline == float("inf"):
                    deadline = now + self.cfg.drain_s + 5
                if now >= deadline:
                    log.warning("workers still running after the drain deadline; killing")
                    self._signal_workers(signal.SIGKILL)
                    deadline = now + 5
            else:
                self.manage_workers(now)
            self._sleep(1.0)

    def _queue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # the loop does the work

    def _sleep(self, timeout: float) -> None:
        pending = [s.respawn_at - time.monotonic() for s in self.slots
                   if not s.pid and s.respawn_at and not self.stopping]
        if pending:
            timeout = max(0.0, min([timeout, *pending]))
        try:
            r, _, _ = select.select([self._wake_r], [], [], timeout)
            if r:
                while os.read(self._wake_r, 512):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name.lower()
            getattr(self, f"handle_{name[3:]}", lambda: None)()

    def handle_chld(self) -> None:
        pass  # reap_workers runs every turn

    def handle_term(self) -> None:
        if self.stopping:
            return
        log.info("SIGTERM: no new requests; running transfers get %ds to finish",
                 self.cfg.drain_s)
        self.stopping = "drain"
        self._close_listen_sockets()
        self._signal_workers(signal.SIGTERM)

    def handle_int(self) -> None:
        self.handle_quit()

    def handle_quit(self) -> None:
        log.info("stopping now")
        self.stopping = "now"
        self._close_listen_sockets()
        self._signal_workers(signal.SIGQUIT)

    def handle_usr1(self) -> None:
        if self.stats:
            log.info("totals: %s", self.stats.summary())

    def handle_hup(self) -> None:
        log.info("SIGHUP: reload is not supported yet (issue 8); ignored")

    def _close_listen_sockets(self) -> None:
        for slot in self.slots:
            for sock in slot.sockets:
                sock.close()
            slot.sockets = []

    def _signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            if os.WIFSIGNALED(status):
                how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                how = f"exited with {os.WEXITSTATUS(status)}"
            if self.stopping:
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_FAILED:
                log.error("worker %d failed to start; stopping", slot.index)
                self.stopping = "now"
                self._signal_workers(signal.SIGQUIT)
                continue
            now = time.monotonic()
            slot.quick_deaths = slot.quick_deaths + 1 if now - slot.started < RESPAWN_WINDOW \
                else 0
            # Replace at once; a worker that keeps dying young waits longer each time,
            # so a crash loop does not spin.
            delay = 0.0 if slot.quick_deaths < 3 else min(
                MAX_BACKOFF, 0.5 * 2 ** (slot.quick_deaths - 3))
            slot.respawn_at = now + delay
            log.warning("worker %d (pid %d) %s; replacing%s", slot.index, pid, how,
                        f" in {delay:.1f}s" if delay else "")

    def manage_workers(self, now: float) -> None:
        for slot in self.slots:
            if not slot.pid and now >= slot.respawn_at:
                self.spawn_worker(slot)

    def spawn_worker(self, slot: Slot) -> None:
        # Signals stay blocked across fork() until the worker has its own handlers;
        # otherwise a TERM in between runs the master's handler in the child and is
        # lost there (the worker would never drain).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            slot.pid = pid
            slot.started = time.monotonic()
            slot.respawn_at = 0.0
            return
        code = EXIT_BOOT_FAILED
        try:
            code = self._worker_main(slot)
        except Exception:
            log.exception("worker %d crashed", slot.index)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _worker_main(self, slot: Slot) -> int:
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        for other in self.slots:
            if other is not slot:
                for sock in other.sockets:
                    sock.close()
        listeners = []
        for sock in slot.sockets:
            pk = wants_pktinfo(sock)
            listeners.append(Listener(sock, pk, sock.getsockname()[0]))
        assert self.root is not None
        try:
            worker = Worker(self.cfg, listeners, self.root, self.datapath,
                            self.stats.row(slot.index) if self.stats else None, self.gz)
        except Exception:
            log.exception("worker %d failed to start", slot.index)
            return EXIT_BOOT_FAILED
        profile_dir = os.environ.get("TFTPD_PROFILE")
        if profile_dir:
            # Developers: one cProfile file per worker, written when it exits.
            import cProfile

            prof = cProfile.Profile()
            try:
                return prof.runcall(worker.run)
            finally:
                prof.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
        return worker.run()


def _claim_port(addr: Address) -> int:
    """Check the port is free, and pick one for port 0.

    SO_REUSEPORT would let our sockets join those of another server of the same
    user on the same port, each then getting a share of the requests. A plain bind
    first fails with EADDRINUSE if anything holds the port, reuseport or not.
    """
    probe = socket.socket(addr.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if addr.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((addr.host, addr.port))
        return probe.getsockname()[1]
    except OSError as err:
        raise _bind_error(addr, addr.port, err) from None
    finally:
        probe.close()


def _bind_error(addr: Address, port: int, err: OSError) -> StartupError:
    where = str(Address(addr.family, addr.host, port))
    if err.errno == errno.EADDRINUSE:
        return StartupError(f"{where}: address already in use (another TFTP server, "
                            "such as tftpd-hpa or inetd, may hold the port)")
    if err.errno == errno.EACCES:
        return StartupError(f"{where}: permission denied (ports below 1024 need root "
                            "or CAP_NET_BIND_SERVICE)")
    if err.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{where}: no interface has this address")
    return StartupError(f"{where}: {err.strerror}")


def _listen_socket(addr: Address, port: int) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _size_rcvbuf(sock)
        sock.bind((addr.host, port))
        enable_pktinfo(sock)  # every listener: destination address and interface
    except OSError as err:
        sock.close()
        raise _bind_error(addr, port, err) from None
    return sock


def _size_rcvbuf(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, LISTEN_RCVBUF)  # SO_RCVBUFFORCE
    except OSError:
        # Unprivileged: capped at net.core.rmem_max; say so once if that is small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if got < LISTEN_RCVBUF:
            log.warning("listen buffer is %d bytes (net.core.rmem_max); a storm may "
                        "overflow it: raise the sysctl or start as root", got)


def _raise_nofile() -> None:
    # A thousand transfers are a thousand sockets; the usual soft limit is 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _drop_privileges(user: str) -> None:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise StartupError(f"-u {user}: no such user") from None
    try:
        os.initgroups(user, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except PermissionError:
        raise StartupError(f"-u {user}: not permitted (start as root to switch users)") \
            from None


def default_gz_cache() -> str:
    if os.geteuid() == 0:
        return "/var/cache/tftpd"
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"tftpd-gz-{os.geteuid()}")


def daemonize() -> None:
    """Detach as in.tftpd -l does: fork twice, new session, stdio to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(fd, std)
    if fd > 2:
        os.close(fd)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
