"""--content-hook MODULE:FUNCTION: Python that decides, per request, what is served.

The function runs in a bounded pool of threads, never in a loop thread: a slow hook
costs its own requests their timeout, not everyone's. Each call's timeout counts from
its submission (time spent queued behind busy threads included); a watchdog thread
completes a call that overran with HookTimeout, whatever the hook is still doing, and
a call whose time ran out while queued is never started.

A ContentHook loads the module when it is made, so it is made where the hook runs: in
a worker, after privileges are dropped. The module is looked up first in the
directories given (the config file's, then the current one), then on sys.path. A
module found as a single file in those directories is compiled afresh from its source
on every load, so reload() sees the file as it is now.
"""

from __future__ import annotations

import collections
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

log = logging.getLogger("tftpd")

POOL_THREADS = 16  # calls running at once, per worker
MAX_QUEUED = 1024  # calls waiting for a thread; more fail at once as timed out
SLOW_S = 0.01  # a call running this long (calls waiting behind it): one more thread
_SPEC = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)")


class HookTimeout(Exception):
    """The hook did not answer within its timeout (the request gets 504/ERROR 0)."""


class HookUnavailable(Exception):
    """The hook's module could not be loaded, or has no such function."""


def parse_spec(spec: str) -> tuple[str, str]:
    """MODULE:FUNCTION -> (module, function); ValueError when it is not that."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise ValueError(f"{spec!r} is not MODULE:FUNCTION (e.g. pernode_hook:content)")
    return m.group(1), m.group(2)


def load_function(module: str, function: str, search: Sequence[str],
                  forbid: str | None = None) -> Callable[..., Any]:
    """The hook function, its module loaded afresh (see the module's docstring).

    A module whose file lies under `forbid` is refused before it runs: with uploads
    allowed (--create) that is the served root, where a client could write it."""
    path = None
    if "." not in module:
        spec = importlib.machinery.PathFinder.find_spec(module, [d for d in search if d])
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader) \
                and not spec.submodule_search_locations:
            path = spec.origin
    if forbid is not None:
        where = path
        if where is None:
            # What an import would run first: the top-level module or package (finding
            # a top-level spec runs nothing).
            top = importlib.util.find_spec(module.partition(".")[0])
            where = top.origin if top is not None else None
        if where is not None and _under(where, forbid):
            raise HookUnavailable(f"{where} is under {forbid}, where clients may upload "
                                  "files; keep the hook module outside the served root")
    if path is not None:
        before = sys.modules.get(module)
        if before is not None and not getattr(before, "__tftpd_hook__", False):
            # Loading it would replace a module the server (or Python) already uses.
            raise HookUnavailable(f"{path}: the name {module!r} is taken by a module "
                                  "already imported; give the hook module another name")
        with open(path, "rb") as f:
            source = f.read()
        mod = types.ModuleType(module)
        mod.__file__ = path
        mod.__tftpd_hook__ = True  # type: ignore[attr-defined]
        code = compile(source, path, "exec", dont_inherit=True)
        sys.modules[module] = mod  # what dataclasses and pickle look up while it runs
        try:
            exec(code, mod.__dict__)  # noqa: S102 - running the configured hook is the point
        except BaseException:
            if before is not None:
                sys.modules[module] = before
            else:
                del sys.modules[module]
            raise
    else:
        loaded = sys.modules.get(module)
        mod = importlib.reload(loaded) if loaded is not None else \
            importlib.import_module(module)
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise HookUnavailable(f"{module} has no function {function!r}")
    return fn


def _under(path: str, directory: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, top]) == top


class ContentHook:
    """The configured hook, shared by the threads of one worker.

    Calls wait in one queue, answered in order by as few threads as keep it moving:
    the first call starts one thread, which takes call after call while it holds the
    GIL (a fast hook costs no thread switch per call, and no threads contend with the
    loop for the GIL). Another thread is started (up to `threads`) only while calls
    are waiting and every thread has been inside one call for SLOW_S or more: a hook
    that sleeps or blocks holds up no more than that the calls queued behind it.
    """

    def __init__(self, spec: str, timeout: float, search: Sequence[str] = (), *,
                 forbid: str | None = None, threads: int = POOL_THREADS,
                 max_queued: int = MAX_QUEUED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.forbid = forbid  # no module from under here (the root, when uploads are on)
        self.module, self.function = parse_spec(spec)
        self.timeout = timeout
        self.search = tuple(search)
        self.max_queued = max_queued
        self.clock = clock
        self.error: str | None = None  # why the module is not loaded, if it is not
        self._fn: Callable[..., Any] | None = None
        self._lock = threading.Lock()
        # Calls not answered yet, in submission order, which is deadline order too
        # (one timeout for all): the watchdog's list.
        self._due: collections.deque[tuple[float, Future]] = collections.deque()
        # Calls waiting for a thread.
        self._calls: collections.deque[tuple[Callable[..., Any], object, Future]] = \
            collections.deque()
        self._closed = False
        self._wake = threading.Condition(self._lock)  # the watchdog sleeps on it
        self._watch_until = float("inf")  # when the watchdog wakes next, at the latest
        self._ready = threading.Condition(self._lock)  # idle pool threads sleep on it
        # Daemon threads, started as calls need them: a hook that never returns must
        # not hold up the worker's exit (ThreadPoolExecutor joins its threads at exit).
        self._threads: list[threading.Thread] = []
        self._since: list[float] = []  # per thread: when its call began (inf: none)
        self._max_threads = threads
        self._idle = 0  # threads asleep on _ready and not yet woken
        self._watchdog = threading.Thread(target=self._watch, name="tftpd-hook-watchdog",
                                          daemon=True)
        self._watchdog.start()
        self.reload()

    def reload(self) -> None:
        """Load the module afresh. When that fails the function loaded before stays
        (and the error is logged); with none loaded, every call fails."""
        try:
            fn = load_function(self.module, self.function, self.search, self.forbid)
        except Exception as err:  # noqa: BLE001 - a broken hook must not stop the worker
            self.error = f"content hook {self.spec}: {type(err).__name__}: {err}"
            log.error("%s%s", self.error,
                      "; keeping the one loaded before" if self._fn is not None else "")
            return
        self._fn, self.error = fn, None

    def submit(self, req: object) -> Future:
        """Call the hook with `req` in the pool; the future holds its return value, or
        the exception it raised, or HookTimeout."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        fn = self._fn
        if fn is None:
            fut.set_exception(HookUnavailable(self.error or "content hook not loaded"))
            return fut
        with self._lock:
            if self._closed:
                fut.set_exception(HookUnavailable("content hook closed"))
                return fut
            if len(self._calls) >= self.max_queued:
                fut.set_exception(HookTimeout("too many calls waiting for the content hook"))
                return fut
            deadline = self.clock() + self.timeout
            self._due.append((deadline, fut))
            self._calls.append((fn, req, fut))
            # The watchdog must wake by this deadline (it sleeps without one when
            # nothing was due), or by the moment it should judge whether the busy
            # threads need another beside them.
            wake = deadline < self._watch_until
            if self._idle:
                self._idle -= 1
                self._ready.notify()
            elif not self._threads:
                self._start_thread()
            elif len(self._threads) < self._max_threads \
                    and self._watch_until - (deadline - self.timeout) > SLOW_S:
                wake = True
            if wake:
                self._watch_until = float("-inf")
                self._wake.notify()
        return fut

    @property
    def threads(self) -> int:
        """Threads started so far (at most `threads`)."""
        return len(self._threads)

    def _start_thread(self) -> None:
        """With the lock held: one more pool thread."""
        index = len(self._threads)
        self._since.append(float("inf"))
        t = threading.Thread(target=self._serve, args=(index,), name="tftpd-hook",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _serve(self, index: int) -> None:
        """A pool thread: call the hook for each call queued, until close()."""
        calls, since, clock = self._calls, self._since, self.clock
        while True:
            with self._lock:
                while not calls:
                    since[index] = float("inf")
                    if self._closed:
                        return
                    self._idle += 1
                    self._ready.wait()
                fn, req, fut = calls.popleft()
                since[index] = clock()
            if not fut.done():  # else its time ran out in the queue: not worth starting
                try:
                    value = fn(req)
                except BaseException as err:  # noqa: BLE001 - the request pays, not the worker
                    _settle(fut, None, err)
                else:
                    _settle(fut, value, None)
            del fn, req, fut

    def _watch(self) -> None:
        """Complete every call whose deadline passed, and start a pool thread when
        calls wait behind threads all busy for SLOW_S (the watchdog thread). Futures
        are completed outside the lock: their callbacks run in this thread."""
        due = self._due
        while True:
            expired = []
            with self._lock:
                if self._closed:
                    return
                now = self.clock()
                while due and (due[0][1].done() or due[0][0] <= now):
                    expired.append(due.popleft()[1])
                if not expired:
                    until = due[0][0] if due else float("inf")
                    if self._calls and not self._idle and \
                            len(self._threads) < self._max_threads:
                        began = max(self._since)
                        if began == float("inf"):  # woken, not yet in its call
                            began = now
                        if now - began >= SLOW_S:
                            self._start_thread()
                            began = now
                        until = min(until, began + SLOW_S)
                    self._watch_until = until
                    self._wake.wait(until - now if until != float("inf") else None)
                    self._watch_until = float("-inf")  # awake: no need to wake it
            for fut in expired:
                _settle(fut, None, HookTimeout(
                    f"content hook took longer than {self.timeout:g}s"))

    def close(self) -> None:
        """Stop: calls not answered yet complete as timed out; running hook calls are
        not waited for (a hung hook must not hold up the worker's exit)."""
        with self._lock:
            self._closed = True
            left = [fut for _, fut in self._due]
            self._due.clear()
            self._calls.clear()
            self._wake.notify()
            self._ready.notify_all()
            self._idle = 0
        for fut in left:
            _settle(fut, None, HookTimeout("content hook closed"))


def _settle(fut: Future, value: Any, err: BaseException | None) -> None:
    """Complete `fut` unless the watchdog or the hook did first."""
    try:
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)
    except InvalidStateError:
        pass


def hook_search_path(config_file: str | None) -> tuple[str, ...]:
    """Where a hook module is looked for before sys.path: the config file's directory
    (when there is one), then the current directory."""
    dirs = []
    if config_file:
        dirs.append(os.path.dirname(os.path.abspath(config_file)))
    dirs.append(os.getcwd())
    return tuple(dict.fromkeys(dirs))
