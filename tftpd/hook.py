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

import heapq
import importlib
import importlib.machinery
import importlib.util
import itertools
import logging
import os
import queue
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
    """The configured hook, shared by the threads of one worker."""

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
        self._due: list[tuple[float, int, Future]] = []  # (deadline, seq, future)
        self._seq = itertools.count()
        self._queued = 0
        self._closed = False
        self._wake = threading.Condition(self._lock)
        # Daemon threads, started as calls need them: a hook that never returns must
        # not hold up the worker's exit (ThreadPoolExecutor joins its threads at exit).
        self._work: queue.SimpleQueue[tuple[Callable[..., Any], object, Future] | None] = \
            queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._max_threads = threads
        self._idle = 0
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
            if self._queued >= self.max_queued:
                fut.set_exception(HookTimeout("too many calls waiting for the content hook"))
                return fut
            self._queued += 1
            heapq.heappush(self._due, (self.clock() + self.timeout, next(self._seq), fut))
            if self._due[0][2] is fut:  # the watchdog sleeps until the earliest deadline
                self._wake.notify()
            if self._idle == 0 and len(self._threads) < self._max_threads:
                t = threading.Thread(target=self._serve, name="tftpd-hook", daemon=True)
                self._threads.append(t)
                t.start()
            else:
                self._idle -= min(1, self._idle)
        self._work.put((fn, req, fut))
        return fut

    @property
    def threads(self) -> int:
        """Threads started so far (at most `threads`)."""
        return len(self._threads)

    def _serve(self) -> None:
        """A pool thread: call the hook for each call queued, until close()."""
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, req, fut = item
            with self._lock:
                self._queued -= 1
            if not fut.done():  # else its time ran out in the queue: not worth starting
                try:
                    value = fn(req)
                except BaseException as err:  # noqa: BLE001 - the request pays, not the worker
                    _settle(fut, None, err)
                else:
                    _settle(fut, value, None)
            del item, fn, req, fut
            with self._lock:
                self._idle += 1

    def _watch(self) -> None:
        """Complete every call whose deadline passed (the watchdog thread). Futures
        are completed outside the lock: their callbacks run in this thread."""
        while True:
            expired = []
            with self._lock:
                if self._closed:
                    return
                now = self.clock()
                while self._due and (self._due[0][2].done() or self._due[0][0] <= now):
                    expired.append(heapq.heappop(self._due)[2])
                if not expired:
                    self._wake.wait(self._due[0][0] - now if self._due else None)
            for fut in expired:
                _settle(fut, None, HookTimeout(
                    f"content hook took longer than {self.timeout:g}s"))

    def close(self) -> None:
        """Stop: calls not answered yet complete as timed out; running hook calls are
        not waited for (a hung hook must not hold up the worker's exit)."""
        with self._lock:
            self._closed = True
            left = [fut for _, _, fut in self._due]
            self._due.clear()
            self._wake.notify()
            threads = len(self._threads)
        for fut in left:
            _settle(fut, None, HookTimeout("content hook closed"))
        for _ in range(threads):
            self._work.put(None)


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
