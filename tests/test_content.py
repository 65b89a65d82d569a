"""The content seam: names to files through the hook and the per-client roots, over a
real FileCache and root."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from concurrent.futures import Future, wait
from pathlib import Path

import pytest

from tftpd import packet as P
from tftpd.content import (
    HOOK_FAILED,
    HOOK_TIMED_OUT,
    ContentResolver,
    PendingContent,
    Resolution,
)
from tftpd.files import FileCache, Root
from tftpd.hook import ContentHook, HookTimeout, parse_spec
from tftpd.neighbours import ClientRoots, NeighbourCache

WAIT = 10.0  # s: bound on any wait for a hook's future

HOOKS = '''
import threading, time
CALLS = []
GATE = threading.Event()

def record(req):
    CALLS.append(req)
    return None

def answer_bytes(req):
    CALLS.append(req)
    return b"hello " + req.filename.encode()

def answer_path(req):
    CALLS.append(req)
    return PATH

def boom(req):
    CALLS.append(req)
    raise RuntimeError("inventory unreadable")

def slow(req):
    CALLS.append(req)
    GATE.wait(30)
    return b"late"

def wrong_type(req):
    return 42

def slow_for_some(req):
    CALLS.append(req)
    if req.filename.startswith("slow"):
        GATE.wait(30)
        return b"late"
    return b"quick"

PATH = "other.txt"
'''


def _module(tmp_path: Path, name: str, text: str = HOOKS) -> Path:
    d = tmp_path / "hooks"
    d.mkdir(exist_ok=True)
    (d / f"{name}.py").write_text(text)
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "pxelinux.cfg").mkdir(parents=True)
    (r / "pxelinux.cfg" / "default").write_text("shared default\n")
    (r / "other.txt").write_text("other file\n")
    (r / "shared.txt").write_text("shared\n")
    (tmp_path / "outside.txt").write_text("secret\n")
    (r / "escape").symlink_to(tmp_path / "outside.txt")
    return r


_names = iter(range(10**6))


@pytest.fixture
def hook_module(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh module of hook functions (a new name each test: nothing shared)."""
    name = f"content_hooks_{os.getpid()}_{next(_names)}"
    d = _module(tmp_path, name)
    made: list[ContentHook] = []

    def make(function: str, timeout: float = 5.0, **kw) -> ContentHook:  # type: ignore[no-untyped-def]
        h = ContentHook(f"{name}:{function}", timeout, [str(d)], **kw)
        made.append(h)
        return h

    yield make, name
    for h in made:
        mod = sys.modules.get(name)
        if mod is not None:
            mod.GATE.set()
        h.close()
    sys.modules.pop(name, None)


def _resolve(res: ContentResolver, name: bytes, client: tuple[str, int] = ("10.0.0.5", 2000),
             mode: str = "octet", options: dict[str, str] | None = None) -> Resolution:
    out = res.begin(name, mode, client, "tftp", options or {})
    if isinstance(out, PendingContent):
        done, _ = wait([out.future], timeout=WAIT)
        assert done, "the hook's future never completed"
        out = res.complete(out)
    return out


def _text(r: Resolution) -> str:
    assert r.file is not None, r.error and (r.error.message, r.error.reason)
    try:
        return os.pread(r.file.fd, r.file.size, 0).decode()
    finally:
        r.file.close()


def _calls(name: str) -> list:
    return sys.modules[name].CALLS


# -- the hook's answers ------------------------------------------------------------------

def test_none_serves_the_file_asked_and_the_request_says_who_asked(root: Path,
                                                                   hook_module) -> None:  # type: ignore[no-untyped-def]
    make, name = hook_module
    neighbours = NeighbourCache(lookup=lambda ip: "52:54:00:12:34:56" if ip == "10.0.0.5"
                                else None)
    res = ContentResolver(FileCache(Root(str(root))), hook=make("record"),
                          neighbours=neighbours)
    r = _resolve(res, b"\\pxelinux.cfg//default", ("::ffff:10.0.0.5", 2001),
                 options={"blksize": "1468"})
    assert _text(r) == "shared default\n" and r.http_status == 200
    (req,) = _calls(name)
    assert req.client == ("10.0.0.5", 2001)
    assert req.filename == "pxelinux.cfg/default"
    assert req.mac == "52:54:00:12:34:56" and req.protocol == "tftp"
    assert req.options == {"blksize": "1468"} and req.mode == "octet"
    assert res.per_client


def test_bytes_are_served_from_a_sealed_memfd_with_an_identity_of_their_own(
        root: Path, hook_module, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make, _ = hook_module
    res = ContentResolver(FileCache(Root(str(root))), hook=make("answer_bytes"))
    a = _resolve(res, b"pxelinux.cfg/01-52-54-00-12-34-56")
    b = _resolve(res, b"pxelinux.cfg/01-52-54-00-12-34-56")
    assert a.file is not None and b.file is not None
    body = b"hello pxelinux.cfg/01-52-54-00-12-34-56"
    assert a.file.size == len(body) and os.fstat(a.file.fd).st_size == len(body)
    assert a.file.ident != b.file.ident and not a.file.derived
    assert os.pread(a.file.fd, 100, 0) == body and a.file.image == body
    # sendfile (HTTP) reads it like any file
    out = tmp_path / "sent"
    with open(out, "wb") as f:
        assert os.sendfile(f.fileno(), a.file.fd, 0, a.file.size) == len(body)
    assert out.read_bytes() == body
    if hasattr(fcntl, "F_GET_SEALS"):
        seals = fcntl.fcntl(a.file.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_GROW
        with pytest.raises(OSError):
            os.pwrite(a.file.fd, b"x", 0)
    a.file.close()
    b.file.close()


def test_bytes_in_netascii_mode_are_converted(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    make, _ = hook_module
    res = ContentResolver(FileCache(Root(str(root))), hook=make("answer_bytes"))
    r = _resolve(res, b"a\nb", mode="octet")
    assert r.error is not None  # a control byte in the name: refused before the hook
    r = _resolve(res, b"x.txt", mode="netascii")
    assert _text(r) == "hello x.txt"


def test_a_path_is_served_instead_through_the_same_confined_root(root: Path,
                                                                 hook_module) -> None:  # type: ignore[no-untyped-def]
    make, name = hook_module
    cache = FileCache(Root(str(root)))
    res = ContentResolver(cache, hook=make("answer_path"))
    assert _text(_resolve(res, b"pxelinux.cfg/default")) == "other file\n"
    mod = sys.modules[name]
    for path, code, status in (("../outside.txt", P.E_ACCESS, 403),
                               ("escape", P.E_ACCESS, 403),  # a symlink leading out
                               ("missing.txt", P.E_NOT_FOUND, 404),
                               (str(root.parent / "outside.txt"), P.E_NOT_FOUND, 404)):
        mod.PATH = path
        r = _resolve(res, b"pxelinux.cfg/default")
        assert r.file is None and r.error is not None, path
        assert (r.error.code, r.http_status) == (code, status), path
    mod.PATH = str(root / "shared.txt")  # the root spelt out: relative to it
    assert _text(_resolve(res, b"pxelinux.cfg/default")) == "shared\n"


@pytest.mark.parametrize("name", [b"../etc/passwd", b"a/../../b", b"x\x01y", b"/", b""])
def test_names_refused_by_normalize_never_reach_the_hook(root: Path, hook_module,
                                                          name: bytes) -> None:  # type: ignore[no-untyped-def]
    make, mod = hook_module
    res = ContentResolver(FileCache(Root(str(root))), hook=make("record"))
    r = res.begin(name, "octet", ("10.0.0.5", 1), "http", {})
    assert isinstance(r, Resolution) and r.error is not None
    assert r.error.code == P.E_ACCESS and r.http_status == 403
    assert _calls(mod) == []


def test_a_raising_hook_costs_its_request_and_logs_rate_limited(
        root: Path, hook_module, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    make, mod = hook_module
    res = ContentResolver(FileCache(Root(str(root))), hook=make("boom"))
    with caplog.at_level(logging.ERROR, logger="tftpd"):
        results = [_resolve(res, b"pxelinux.cfg/default") for _ in range(6)]
    for r in results:
        assert r.file is None and r.error is not None and r.http_status == 500
        assert (r.error.code, r.error.message) == (P.E_UNDEFINED, HOOK_FAILED)
        assert "inventory unreadable" in r.error.reason
    failed = [rec for rec in caplog.records if "content hook failed" in rec.getMessage()]
    assert 1 <= len(failed) < 6  # one record a call, then held back for this client
    assert failed[0].exc_info is not None and "inventory unreadable" in failed[0].getMessage()
    assert res.hook_failed == 6 and len(_calls(mod)) == 6
    # the next request is served as usual once the hook answers
    wrong = ContentResolver(FileCache(Root(str(root))), hook=make("wrong_type"))
    r = _resolve(wrong, b"other.txt")
    assert r.http_status == 500 and r.error is not None and "int" in r.error.reason


def test_a_slow_hook_times_out_without_blocking_the_caller(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    make, mod = hook_module
    hook = make("slow", timeout=0.3, threads=1)
    res = ContentResolver(FileCache(Root(str(root))), hook=hook)
    t0 = time.monotonic()
    first = res.begin(b"a.txt", "octet", ("10.0.0.5", 1), "tftp", {})
    second = res.begin(b"b.txt", "octet", ("10.0.0.6", 1), "tftp", {})  # queued
    assert isinstance(first, PendingContent) and isinstance(second, PendingContent)
    assert not first.future.done()  # begin() returned while the hook still runs
    done, _ = wait([first.future, second.future], timeout=WAIT)
    assert len(done) == 2
    assert time.monotonic() - t0 < WAIT
    for p in (first, second):
        assert isinstance(p.future.exception(), HookTimeout)
        r = res.complete(p)
        assert r.error is not None and r.http_status == 504
        assert (r.error.code, r.error.message) == (P.E_UNDEFINED, HOOK_TIMED_OUT)
    # the queued call's time ran out before a thread was free: never started
    assert [c.filename for c in _calls(mod)] == ["a.txt"]
    assert hook.threads == 1 and res.hook_timed_out == 2


def test_a_lone_slow_call_times_out(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    """The timeout holds for a call with nothing else in flight: the first call (which
    starts the pool's thread) and a call that wakes an idle thread alike."""
    make, _ = hook_module

    def times_out(fut: Future) -> None:
        t0 = time.monotonic()
        done, _ = wait([fut], timeout=WAIT)
        assert done and time.monotonic() - t0 < 0.3 + 2.0
        assert isinstance(fut.exception(), HookTimeout)

    times_out(make("slow", timeout=0.3).submit(object()))  # the first call
    hook = make("slow_for_some", timeout=0.3)
    res = ContentResolver(FileCache(Root(str(root))), hook=hook)
    quick = res.begin(b"quick.txt", "octet", ("10.0.0.5", 1), "tftp", {})
    assert isinstance(quick, PendingContent)
    assert wait([quick.future], timeout=WAIT).done and _text(res.complete(quick)) == "quick"
    slow = res.begin(b"slow.txt", "octet", ("10.0.0.5", 1), "tftp", {})  # an idle thread
    assert isinstance(slow, PendingContent)
    times_out(slow.future)


def test_complete_waits_for_the_hook(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    make, mod = hook_module
    res = ContentResolver(FileCache(Root(str(root))), hook=make("slow", timeout=30.0))
    pending = res.begin(b"c.txt", "octet", ("10.0.0.5", 1), "tftp", {})
    assert isinstance(pending, PendingContent) and not pending.future.done()
    with pytest.raises(ValueError):
        res.complete(pending)
    sys.modules[mod].GATE.set()
    assert wait([pending.future], timeout=WAIT).done
    assert _text(res.complete(pending)) == "late"


def test_the_queue_is_bounded(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    make, mod = hook_module
    hook = make("slow", timeout=30.0, threads=1, max_queued=2)
    futures = [hook.submit(object()) for _ in range(4)]
    # One call runs (or is about to), two wait; past max_queued a call fails at once.
    assert futures[3].done() and isinstance(futures[3].exception(timeout=0), HookTimeout)
    assert not futures[0].done() and not futures[1].done()
    sys.modules[mod].GATE.set()
    done, _ = wait(futures, timeout=WAIT)
    assert len(done) == 4
    assert [f.result() for f in futures[:2]] == [b"late", b"late"]


def test_a_fast_hook_is_answered_by_one_thread(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    make, _ = hook_module
    hook = make("answer_bytes", threads=8)
    futures = [hook.submit(SimpleNamespace(filename=f"f{i}")) for i in range(500)]
    done, _ = wait(futures, timeout=WAIT)
    assert len(done) == 500
    assert [f.result() for f in futures] == [f"hello f{i}".encode() for i in range(500)]
    # No call ran for long: no pool of threads contending for the GIL (one thread,
    # or two when a busy machine held the first off the CPU for SLOW_S mid-call).
    assert hook.threads <= 2


def test_calls_queued_behind_a_blocked_hook_get_another_thread(  # type: ignore[no-untyped-def]
        root: Path, hook_module) -> None:
    from types import SimpleNamespace

    make, mod = hook_module
    hook = make("slow_for_some", timeout=30.0, threads=4)
    # The one thread is idle when a blocking call comes, then one more.
    assert hook.submit(SimpleNamespace(filename="first")).result(timeout=WAIT) == b"quick"
    held = hook.submit(SimpleNamespace(filename="slow-held"))
    assert hook.submit(SimpleNamespace(filename="next")).result(timeout=WAIT) == b"quick"
    assert hook.threads == 2 and not held.done()
    # Submitted at once: the second blocked call takes the thread started for it,
    # and the quick ones behind it need a third.
    blocked = [hook.submit(SimpleNamespace(filename=f"slow-{i}")) for i in range(2)]
    quick = [hook.submit(SimpleNamespace(filename=f"q{i}")) for i in range(20)]
    done, _ = wait(quick, timeout=WAIT)
    assert len(done) == 20 and all(f.result() == b"quick" for f in quick)
    assert not any(f.done() for f in blocked)
    assert hook.threads == 4
    sys.modules[mod].GATE.set()
    assert len(wait(blocked, timeout=WAIT).done) == 2
    assert [f.result() for f in blocked] == [b"late", b"late"]


def test_reload_picks_up_the_changed_module_and_keeps_it_when_broken(
        tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = f"reloaded_hook_{os.getpid()}"
    d = _module(tmp_path, name, "def content(req):\n    return b'version 1'\n")
    hook = ContentHook(f"{name}:content", 5.0, [str(d)])
    try:
        res = ContentResolver(FileCache(Root(str(root))), hook=hook)
        assert _text(_resolve(res, b"x")) == "version 1"
        # same size, same second: a bytecode cache keyed by mtime would miss this
        (d / f"{name}.py").write_text("def content(req):\n    return b'version 2'\n")
        hook.reload()
        assert _text(_resolve(res, b"x")) == "version 2"
        (d / f"{name}.py").write_text("def content(req:\n")
        with caplog.at_level(logging.ERROR, logger="tftpd"):
            hook.reload()
        assert hook.error is not None and "SyntaxError" in hook.error
        assert any("keeping the one loaded before" in r.getMessage() for r in caplog.records)
        assert _text(_resolve(res, b"x")) == "version 2"
    finally:
        hook.close()
        sys.modules.pop(name, None)


def test_a_hook_that_cannot_load_fails_each_request(tmp_path: Path, root: Path) -> None:
    hook = ContentHook("no_such_module_anywhere:content", 5.0, [str(tmp_path)])
    try:
        assert hook.error is not None and "ModuleNotFoundError" in hook.error
        res = ContentResolver(FileCache(Root(str(root))), hook=hook)
        r = _resolve(res, b"other.txt")
        assert r.http_status == 500 and r.error is not None
    finally:
        hook.close()
    d = _module(tmp_path, "hook_without_function", "x = 1\n")
    hook = ContentHook("hook_without_function:content", 5.0, [str(d)])
    try:
        assert hook.error is not None and "no function 'content'" in hook.error
    finally:
        hook.close()
        sys.modules.pop("hook_without_function", None)


def test_a_module_where_clients_may_upload_is_refused(tmp_path: Path, root: Path) -> None:
    name = f"uploaded_hook_{os.getpid()}"
    (root / f"{name}.py").write_text("RAN = True\ndef content(req):\n    return b'pwned'\n")
    hook = ContentHook(f"{name}:content", 5.0, [str(root)], forbid=str(root))
    try:
        assert hook.error is not None and "outside the served root" in hook.error
        assert name not in sys.modules  # refused before it ran
        res = ContentResolver(FileCache(Root(str(root))), hook=hook)
        assert _resolve(res, b"other.txt").http_status == 500
    finally:
        hook.close()
    # the same module outside the forbidden directory loads
    hook = ContentHook(f"{name}:content", 5.0, [str(root)], forbid=str(tmp_path / "elsewhere"))
    try:
        assert hook.error is None and sys.modules[name].RAN
    finally:
        hook.close()
        sys.modules.pop(name, None)


@pytest.mark.parametrize("spec", ["mod", "mod:", ":f", "a b:f", "mod:f:g", "1mod:f", "mod:f()"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(spec)
    assert parse_spec(" pkg.mod:fn ") == ("pkg.mod", "fn")


# -- per-client roots ----------------------------------------------------------------------

def test_the_client_directory_comes_first_then_the_root(root: Path) -> None:
    (root / "10.0.0.5" / "pxelinux.cfg").mkdir(parents=True)
    (root / "10.0.0.5" / "pxelinux.cfg" / "default").write_text("node 5\n")
    (root / "fd00::5").mkdir()
    (root / "fd00::5" / "other.txt").write_text("v6 node\n")
    cache = FileCache(Root(str(root)))
    res = ContentResolver(cache, roots=ClientRoots("ip", NeighbourCache(lookup=lambda ip: None)))
    assert res.per_client
    assert _text(_resolve(res, b"pxelinux.cfg/default", ("10.0.0.5", 1))) == "node 5\n"
    assert _text(_resolve(res, b"pxelinux.cfg/default", ("::ffff:10.0.0.5", 1))) == "node 5\n"
    assert _text(_resolve(res, b"pxelinux.cfg/default", ("10.0.0.6", 1))) == "shared default\n"
    assert _text(_resolve(res, b"other.txt", ("fd00:0::5%eth0", 1))) == "v6 node\n"
    assert _text(_resolve(res, b"other.txt", ("10.0.0.5", 1))) == "other file\n"
    # the miss in the client's directory is remembered like any miss
    before = cache.stats.miss_hits
    assert _text(_resolve(res, b"other.txt", ("10.0.0.5", 1))) == "other file\n"
    assert cache.stats.miss_hits == before + 1


def test_a_refused_client_file_is_not_replaced_by_the_shared_one(root: Path,
                                                                 tmp_path: Path) -> None:
    node = root / "10.0.0.5"
    node.mkdir()
    (node / "shared.txt").symlink_to(tmp_path / "outside.txt")  # out of the root
    (root / "10.0.0.7").symlink_to(tmp_path)  # the whole directory, out of the root
    (root / "outside.txt").write_text("inside\n")
    res = ContentResolver(FileCache(Root(str(root))),
                          roots=ClientRoots("ip", NeighbourCache(lookup=lambda ip: None)))
    for client, name in (("10.0.0.5", b"shared.txt"), ("10.0.0.7", b"outside.txt")):
        r = _resolve(res, name, (client, 1))
        assert r.file is None and r.error is not None, client
        assert (r.error.code, r.http_status) == (P.E_ACCESS, 403), client
    assert _text(_resolve(res, b"shared.txt", ("10.0.0.6", 1))) == "shared\n"
    assert _text(_resolve(res, b"outside.txt", ("10.0.0.6", 1))) == "inside\n"


def test_mac_directories_as_pxelinux_writes_them(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    node = root / "01-52-54-00-ab-cd-ef"
    node.mkdir()
    (node / "other.txt").write_text("by mac\n")
    macs = {"10.0.0.5": "52:54:00:AB:CD:EF"}
    neighbours = NeighbourCache(lookup=lambda ip: macs.get(ip, "").lower() or None)
    make, mod = hook_module
    res = ContentResolver(FileCache(Root(str(root))), roots=ClientRoots("mac", neighbours),
                          hook=make("record"))
    assert _text(_resolve(res, b"other.txt", ("10.0.0.5", 1))) == "by mac\n"
    assert _text(_resolve(res, b"other.txt", ("10.0.0.9", 1))) == "other file\n"
    assert [c.mac for c in _calls(mod)] == ["52:54:00:ab:cd:ef", None]
    assert neighbours.lookups == 2  # once per client address, for prefix and hook alike


def test_without_hook_or_roots_the_answer_is_the_file_and_not_per_client(root: Path) -> None:
    res = ContentResolver(FileCache(Root(str(root))))
    assert not res.per_client
    r = res.begin(b"/other.txt", "octet", ("10.0.0.5", 1), "http", {})
    assert isinstance(r, Resolution) and _text(r) == "other file\n"
    r = res.begin(b"nope", "octet", ("10.0.0.5", 1), "http", {})
    assert isinstance(r, Resolution) and r.http_status == 404


def test_many_callers_at_once_each_get_their_own_answer(root: Path, hook_module) -> None:  # type: ignore[no-untyped-def]
    import threading
    from types import SimpleNamespace

    make, _ = hook_module
    hook = make("answer_bytes", threads=4)
    results: dict[str, object] = {}

    def caller(k: int) -> None:
        futures = {f"f{k}-{i}": hook.submit(SimpleNamespace(filename=f"f{k}-{i}"))
                   for i in range(50)}
        for name, fut in futures.items():
            results[name] = fut.result(timeout=WAIT)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 200
    assert all(v == b"hello " + k.encode() for k, v in results.items())
    assert hook.threads <= 4


@pytest.mark.parametrize("data,mode,served", [
    (b"", "octet", b""),
    (b"a\r\nb\n", "octet", b"a\r\nb\n"),
    (b"a\rb\n", "netascii", b"a\r\0b\r\n"),
])
def test_memory_files_hold_exactly_what_is_served(data: bytes, mode: str,
                                                  served: bytes) -> None:
    from tftpd.content import memory_file

    f = memory_file(data, "x", mode)
    try:
        assert f.size == len(served) == os.fstat(f.fd).st_size
        assert os.pread(f.fd, len(served) + 10, 0) == served and f.image == served
        assert f.release is None and not f.derived
    finally:
        f.close()
