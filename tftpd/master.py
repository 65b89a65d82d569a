"""The master: bind, drop privileges, prefork the pool, supervise it.

Shaped after gunicorn's Arbiter: signal handlers only queue the signal; the main
loop dispatches `handle_<name>`. The master stays single-threaded (a process with
threads that forks can deadlock) and never serves a request itself.

Listen sockets (tftpd/listening.py): one SO_REUSEPORT socket per worker slot and
address, kept by the master, so a replacement worker takes over the very socket (and
the requests queued on it) of the worker it replaces.

Heartbeats: a worker stamps its stats row on every loop turn (at least every
worker.IDLE_WAIT). One that stops turning (SIGSTOPped, stuck in C or in a syscall)
does not exit, yet its socket keeps its share of the clients; the master kills it
once it has been silent for HUNG_AFTER and replaces it like a dead one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pwd
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType

from tftpd.config import Config, ConfigError, from_argv
from tftpd.content import build_for_worker, prepare_master
from tftpd.datapath import DataPath
from tftpd.files import Root
from tftpd.gz import GzCache
from tftpd.listening import ListenSockets, StartupError
from tftpd.metrics import MetricsServer, render
from tftpd.outside import Opener, OutsideFiles
from tftpd.remap import RemapError, Rules
from tftpd.stats import BEAT, INDEX, Stats, beat
from tftpd.systemd import Notifier
from tftpd.worker import (
    EXIT_BOOT_FAILED,
    MASTER_SIGNALS,
    Forward,
    Listener,
    WakeupPipe,
    Worker,
    open_sysfs,
    wants_pktinfo,
)

# Developers: TFTPD_PROFILE=DIR writes one cProfile file per worker. Imported here, as
# root: a worker that has dropped privileges or chrooted may not reach the stdlib.
_cprofile: ModuleType | None = None
if os.environ.get("TFTPD_PROFILE"):
    import cProfile as _cprofile

log = logging.getLogger("tftpd")

RESPAWN_WINDOW = 5.0  # s: deaths within this of a start count as a crash loop
MAX_BACKOFF = 30.0
DEFAULT_USER = "nobody"  # in.tftpd's default
STATUS_EVERY = 5.0  # s between STATUS= lines to systemd
ACTIVE = INDEX["active"]
LISTENING = INDEX["listening"]
HTTP_CONNECTIONS = INDEX["http_connections"]
RELOAD_HANDOVER = 2.0  # s an old worker gets to stop reading before its successor starts
# A worker silent this long is killed and replaced. A PXE ROM gives its RRQ 1-4 s and
# tries four or five times (the pxe workload: 1+2+3+4 s), so a client whose request
# queued on a stopped worker is answered by the replacement (which takes over its
# socket and queue) within ~2.5 s: before its second retry, long before it gives up.
# A live worker beats every 0.5 s at least (worker.IDLE_WAIT; C's pump returns by
# then however busy), and during its one long step, making a .gz file (gz.GzCache.beat):
# 2 s is four beats missed. TFTPD_HANG_CHECK=0 turns the check off (a debugger that
# stops a worker).
HUNG_AFTER = 2.0  # s
CHECK_EVERY = 0.5  # s between the master's looks at the beats


@dataclass(slots=True)
class Slot:
    index: int
    sockets: list[socket.socket]
    pid: int = 0
    generation: int = 0  # bumped by each reload: its stats row
    started: float = 0.0
    quick_deaths: int = 0
    respawn_at: float = 0.0
    forward: tuple[socket.socket, socket.socket] | None = None  # (reader, writer)


@dataclass(slots=True)
class Master:
    cfg: Config
    datapath: DataPath
    argv: list[str] = field(default_factory=list)  # re-read on SIGHUP
    slots: list[Slot] = field(default_factory=list)
    bound: list[str] = field(default_factory=list)
    root: Root | None = None
    signals: list[int] = field(default_factory=list)
    stopping: str = ""  # "", "drain" or "now"
    stats: Stats | None = None
    gz: GzCache | None = None
    rules: object | None = None  # remap rules, loaded here (before any chroot)
    outside: OutsideFiles | None = None  # -C and -m, in reach of a chrooted reload
    mode: str = "standalone"  # or "inetd", "systemd"
    shared: bool = False  # a listen socket read by every worker (not reuseport)
    retired: dict[int, Slot] = field(default_factory=dict)  # old generations draining
    restarts: int = 0
    notifier: Notifier = field(default_factory=Notifier)
    metrics: MetricsServer | None = None
    http_socks: list[socket.socket] = field(default_factory=list)  # --http, all workers'
    http_bound: list[str] = field(default_factory=list)
    _sel: selectors.BaseSelector | None = None
    _wakeup: WakeupPipe | None = None  # signals wake the loop through it
    _last_requests: int = -1
    _idle_since: float = 0.0
    hung_after: float = HUNG_AFTER
    watched: dict[int, tuple[memoryview, float]] = field(default_factory=dict)  # pid ->
    #   (its stats row, when it was forked): every worker alive, retired ones too
    _checked_at: float = 0.0
    _watch_from: float = 0.0

    # -- startup ---------------------------------------------------------------------

    def bind(self, inherited: list[socket.socket] | None = None) -> None:
        """Bind every address, or take the sockets inetd or systemd handed us."""
        self.stats = Stats(self.cfg.workers)
        opened = ListenSockets.open(self.cfg, self.cfg.workers, inherited)
        self.slots = [Slot(i, sockets, forward=forward) for i, (sockets, forward)
                      in enumerate(zip(opened.per_slot, opened.forwards, strict=True))]
        self.bound, self.shared = opened.bound, opened.shared
        self.http_socks, self.http_bound = opened.http_socks, opened.http_bound
        if opened.metrics is not None:
            self.metrics = MetricsServer(opened.metrics)

    def prepare(self) -> None:
        """After binding, before forking: limits, chroot, privileges."""
        _raise_nofile()
        root = os.path.abspath(self.cfg.root)
        if not os.path.isdir(root):
            raise StartupError(f"root {root!r} is not a directory")
        self.rules = self._load_rules(self.cfg)
        chrooted = False
        # As in.tftpd: started as root, serve as nobody unless told otherwise, so that
        # nobody runs a network daemon as root by accident. `-u root` stays root.
        user = self.cfg.user
        if user is None and os.geteuid() == 0:
            user = DEFAULT_USER
            if not _can_read_as(DEFAULT_USER, root, self.cfg.secure):
                # The default must not turn a working setup into "Access violation"
                # for every file: say why, and what to give instead.
                log.warning("%s cannot read %s, so the server stays root; give -u USER "
                            "(a user who can read it) or make it readable", DEFAULT_USER,
                            root)
                user = "root"
        if self.cfg.gz:
            # Opened before chroot (the cache is never inside the served root) and
            # handed to the new user, so workers can write to it.
            path = self.cfg.gz_cache or default_gz_cache()
            try:
                self.gz = GzCache.open_dir(path, max_bytes=self.cfg.gz_cache_mb << 20)
            except OSError as err:
                raise StartupError(f"--gz-cache {path}: {err.strerror}") from None
            if user and user != "root":
                try:
                    pw = pwd.getpwnam(user)
                    os.chown(self.gz.dir_fd, pw.pw_uid, pw.pw_gid)
                except (KeyError, OSError):
                    pass
        open_sysfs()
        chroot = self.cfg.secure and os.geteuid() == 0
        prepare_master(self.cfg, chroot)  # what MAC lookups import, before any chroot
        # Who we become is looked up now: inside the chroot there is no /etc/passwd.
        identity = _lookup_user(user) if user and user != "root" else None
        if chroot:
            self.outside = OutsideFiles()
            self.outside.keep(self.cfg.config)
            self.outside.keep(self.cfg.map_file)
            os.chroot(root)
            os.chdir("/")
            root, chrooted = "/", True
        if user == "root":
            log.warning("staying root (-u root): a flaw in a worker would be root's")
        elif identity is not None:
            _drop_privileges(user or "", *identity)
        self.root = Root(root, chrooted=chrooted)

    def _load_rules(self, cfg: Config) -> object | None:
        if not cfg.map_file:
            return None
        try:
            return Rules.load(cfg.map_file, self._opener())
        except (OSError, RemapError) as err:
            raise StartupError(f"--map-file: {err}") from None

    # -- supervision -----------------------------------------------------------------

    def install_signals(self) -> None:
        """Before the ready line: a TERM sent the moment we say we listen is handled."""
        self._wakeup = WakeupPipe()
        signal.set_wakeup_fd(self._wakeup.w)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self._queue_signal)

    def run(self) -> int:
        if self._wakeup is None:
            self.install_signals()
        assert self._wakeup is not None
        if os.environ.get("TFTPD_HANG_CHECK") == "0":
            self.hung_after = 0.0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wakeup.r, selectors.EVENT_READ, None)
        if self.metrics:
            self._sel.register(self.metrics.sock, selectors.EVENT_READ, self.metrics)
        log.info("serving %s on %s (%s, %s)", self.cfg.root, ", ".join(self.bound),
                 workers_text(len(self.slots)), self.mode)
        for slot in self.slots:
            self.spawn_worker(slot)
        self.notifier.ready(self._status())
        deadline = float("inf")
        next_status = time.monotonic() + STATUS_EVERY
        while True:
            self._handle_signals()
            self.reap_workers()
            now = time.monotonic()
            self.check_beats(now)
            if self.stopping:
                alive = [s for s in self.slots if s.pid] + list(self.retired.values())
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
                self._check_idle(now)
                if now >= next_status:
                    next_status = now + STATUS_EVERY
                    self.notifier.status(self._status())
            self._wait(CHECK_EVERY)

    def _queue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # the loop does the work

    def _wait(self, timeout: float) -> None:
        pending = [s.respawn_at - time.monotonic() for s in self.slots
                   if not s.pid and s.respawn_at and not self.stopping]
        if pending:
            timeout = max(0.0, min([timeout, *pending]))
        assert self._sel is not None
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                assert self._wakeup is not None
                self._wakeup.drain()
            elif key.data is self.metrics:
                conn = self.metrics.accept() if self.metrics else None
                if conn is not None:
                    self._sel.register(conn, selectors.EVENT_READ, conn)
            elif self.metrics is not None:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                self._sel.unregister(conn)
                if not self.metrics.on_readable(conn, self._metrics_text()):
                    self._sel.register(conn, selectors.EVENT_READ, conn)

    def _metrics_text(self) -> str:
        assert self.stats is not None
        return render(self.stats.totals(), self.restarts, len(self.slots))

    def _status(self) -> str:
        if self.stats is None:
            return ""
        t = self.stats.totals()
        return (f"{t['active']} transfers running; {t['requests']} requests, {t['ok']} ok, "
                f"{t['probe']} probes, {t['notfound']} misses, {t['failed']} failed")

    def _check_idle(self, now: float) -> None:
        """inetd mode: leave once idle for -t seconds; inetd watches the port again."""
        if self.mode != "inetd" or self.stats is None:
            return
        t = self.stats.totals()
        if t["requests"] != self._last_requests or t["active"]:
            self._last_requests = t["requests"]
            self._idle_since = now
            return
        if now - self._idle_since >= self.cfg.idle_s:
            log.info("idle for %ds; exiting so that inetd takes the port back",
                     self.cfg.idle_s)
            self.handle_term()

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
        self.notifier.stopping()
        self.stopping = "drain"
        self._close_listen_sockets()
        self._signal_workers(signal.SIGTERM)

    def handle_int(self) -> None:
        self.handle_quit()

    def handle_quit(self) -> None:
        log.info("stopping now")
        self.notifier.stopping()
        self.stopping = "now"
        self._close_listen_sockets()
        self._signal_workers(signal.SIGQUIT)

    def handle_usr1(self) -> None:
        if self.stats:
            log.info("totals: %s", self.stats.summary())

    def handle_hup(self) -> None:
        """Reload: new settings and map file for new workers; the old ones stop taking
        requests at once and finish their transfers. A bad configuration is reported
        and the old one kept."""
        if self.stopping:
            return
        self.notifier.reloading()
        try:
            new = from_argv(self.argv, self._opener()) if self.argv else self.cfg
            rules = self._load_rules(new)
        except (ConfigError, StartupError) as err:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", err)
            self.notifier.ready(self._status())
            return
        kept = []
        for name in ("addresses", "workers", "secure", "user", "listen", "foreground",
                     "metrics", "gz_cache", "http"):
            if getattr(new, name) != getattr(self.cfg, name):
                kept.append(name)
        if self.root is not None and self.root.chrooted and new.root != self.cfg.root:
            kept.append("root")
        if kept:
            log.warning("SIGHUP: %s cannot change without a restart; kept as running",
                        ", ".join(kept))
            new = dataclasses.replace(new, **{k: getattr(self.cfg, k) for k in kept})
        if new.gz and self.gz is None:
            log.warning("SIGHUP: --gz cannot be turned on without a restart")
            new = dataclasses.replace(new, gz=False)
        self.cfg = new
        self.rules = rules
        if self.root is not None and not self.root.chrooted:
            self.root = Root(os.path.abspath(new.root))
        for slot in self.slots:
            old = slot.pid
            if old:
                # First the old worker stops reading (its copy of the socket closes;
                # requests queue in the master's), then the new one starts: from the
                # moment the reload is logged, no request meets the old settings.
                self.retired[old] = slot
                try:
                    os.kill(old, signal.SIGTERM)  # stop taking requests, finish, exit
                except ProcessLookupError:
                    pass
                self._await_stopped_listening(slot, old)
            slot.generation += 1
            self.spawn_worker(slot)
        log.info("SIGHUP: reloaded; %d new workers, old ones finish their transfers",
                 len(self.slots))
        self.notifier.ready(self._status())

    def _opener(self) -> Opener | None:
        """How files named in the settings are opened: through the directories kept
        before the chroot, when there is one."""
        return self.outside.opener if self.outside is not None else None

    def _await_stopped_listening(self, slot: Slot, pid: int) -> None:
        assert self.stats is not None
        row = self.stats.row(slot.index, slot.generation)
        deadline = time.monotonic() + RELOAD_HANDOVER
        while row[LISTENING] and time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self.retired.pop(pid, None)
                    self._zero_active(slot, slot.generation)
                    return
            except ChildProcessError:
                return
            time.sleep(0.002)  # a bounded handover, in ms; the master has nothing else
        if row[LISTENING]:
            log.warning("worker pid %d did not stop listening in %.0fs", pid, RELOAD_HANDOVER)

    def _close_listen_sockets(self) -> None:
        """Stopping: TFTP's listening sockets, and HTTP's, so that a new connection is
        refused rather than queued where no worker will take it."""
        for slot in self.slots:
            for sock in slot.sockets:
                sock.close()
            slot.sockets = []
        for sock in self.http_socks:
            sock.close()
        self.http_socks = []

    def _signal_workers(self, sig: int) -> None:
        for pid in [s.pid for s in self.slots if s.pid] + list(self.retired):
            try:
                os.kill(pid, sig)
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
            self.watched.pop(pid, None)
            old = self.retired.pop(pid, None)
            if old is not None:
                self._zero_active(old, old.generation - 1)
                continue
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            self._zero_active(slot, slot.generation)
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
            self._replace(slot, pid, how, time.monotonic())

    def _replace(self, slot: Slot, pid: int, how: str, now: float) -> None:
        self.restarts += 1
        slot.quick_deaths = slot.quick_deaths + 1 if now - slot.started < RESPAWN_WINDOW \
            else 0
        # Replace at once; a worker that keeps dying young waits longer each time,
        # so a crash loop does not spin.
        delay = 0.0 if slot.quick_deaths < 3 else min(
            MAX_BACKOFF, 0.5 * 2 ** (slot.quick_deaths - 3))
        slot.respawn_at = now + delay
        log.warning("worker %d (pid %d) %s; replacing%s", slot.index, pid, how,
                    f" in {delay:.1f}s" if delay else "")

    def check_beats(self, now: float) -> None:
        """Kill a worker that has not beaten for hung_after seconds, and replace it."""
        if self.hung_after <= 0:
            return
        if now - self._checked_at > 2 * CHECK_EVERY:
            # The master itself did not run (stopped with its process group, or held
            # up by a reload's handover): it cannot tell how long a worker was silent,
            # so silence counts from now.
            self._watch_from = now
        self._checked_at = now
        for pid, (row, started) in list(self.watched.items()):
            silent = now - max(row[BEAT] / 1e9, started, self._watch_from)
            if silent >= self.hung_after:
                self._kill_hung(pid, silent, now)

    def _kill_hung(self, pid: int, silent: float, now: float) -> None:
        del self.watched[pid]
        how = f"silent for {silent:.1f}s (stopped or stuck): killed with SIGKILL"
        os.kill(pid, signal.SIGKILL)  # a stopped process dies too; unreaped, pid is ours
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None:
            # Retired by a reload and draining: its successor serves already; it is
            # reaped as any retired worker.
            old = self.retired.get(pid)
            log.warning("worker %d (pid %d) %s", old.index if old else -1, pid, how)
            return
        # Replaced now, not once reaped: a process in uninterruptible sleep dies only
        # when its syscall returns. Killed, it runs no code of its own again, so its
        # socket and stats row pass to the successor at once.
        slot.pid = 0
        self._zero_active(slot, slot.generation)
        if self.stopping:
            log.warning("worker %d (pid %d) %s", slot.index, pid, how)
            return
        self._replace(slot, pid, how, now)

    def _zero_active(self, slot: Slot, generation: int) -> None:
        # A worker that died mid-transfer (or with connections open) cannot lower its
        # own gauges.
        if self.stats is not None:
            row = self.stats.row(slot.index, generation)
            row[ACTIVE] = 0
            row[LISTENING] = 0
            row[HTTP_CONNECTIONS] = 0

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
            if self.stats is not None:
                self.watched[pid] = (self.stats.row(slot.index, slot.generation),
                                     slot.started)
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
        if self._wakeup is not None:
            self._wakeup.close()  # the master's; the worker makes its own
        if self.outside is not None:
            self.outside.close()  # the way out of the chroot stays the master's
        if self._sel is not None:
            self._sel.close()
        if self.metrics is not None:
            for conn in list(self.metrics.conns):
                conn.close()
            self.metrics.sock.close()
        mine = {id(s) for s in slot.sockets}
        for other in self.slots:
            for sock in other.sockets:
                if id(sock) not in mine:
                    sock.close()
            if other is not slot and other.forward is not None:
                other.forward[0].close()  # their reader is theirs
        listeners = [Listener(sock, wants_pktinfo(sock), sock.getsockname()[0],
                              shared=self.shared) for sock in slot.sockets]
        forward = None
        if slot.forward is not None:
            forward = Forward(slot.index, slot.forward[0],
                              [s.forward[1] for s in self.slots if s.forward is not None])
        assert self.root is not None and self.stats is not None
        row = self.stats.row(slot.index, slot.generation)
        if self.gz is not None:
            self.gz.beat = functools.partial(beat, row)  # it beats while making a file
        try:
            # Here, privileges dropped: the content hook's module loads as the worker.
            content = build_for_worker(self.cfg, self.root, self.gz)
            worker = Worker(self.cfg, listeners, self.root, self.datapath, row, self.gz,
                            forward=forward, rules=self.rules, content=content)
            if self.http_socks:
                from tftpd.http import HttpThreads

                worker.http = HttpThreads(self.cfg, self.http_socks, self.root,
                                          self.cfg.http_threads, self.gz, self.rules, row,
                                          content=content.resolver)
                for sock in self.http_socks:
                    sock.close()  # inherited; each HTTP thread has a descriptor of its own
        except Exception:
            log.exception("worker %d failed to start", slot.index)
            return EXIT_BOOT_FAILED
        profile_dir = os.environ.get("TFTPD_PROFILE")
        if profile_dir and _cprofile is not None:
            # Developers: one cProfile file per worker, written when it exits.
            prof = _cprofile.Profile()
            try:
                return prof.runcall(worker.run)
            finally:
                prof.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
        return worker.run()


def workers_text(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _raise_nofile() -> None:
    # A thousand transfers are a thousand sockets; the usual soft limit is 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _can_read_as(user: str, root: str, chrooted: bool) -> bool:
    """Whether USER could list ROOT (through its parents unless chrooted into it)."""
    try:
        uid, gid, groups = _lookup_user(user)
    except StartupError:
        return True  # _drop_privileges will say that the user is missing
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if chrooted:
                os.chroot(root)
                root = "/"
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.close(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
            code = 0
        except OSError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _lookup_user(user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, groups) of USER, read before any chroot."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        hint = " (the default when started as root; give -u USER)" \
            if user == DEFAULT_USER else ""
        raise StartupError(f"-u {user}: no such user{hint}") from None
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(user, pw.pw_gid)


def _drop_privileges(user: str, uid: int, gid: int, groups: list[int]) -> None:
    try:
        if os.geteuid() == 0:
            os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
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
