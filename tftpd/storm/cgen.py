"""The storm's C engine: _cgen.c compiled with the system cc at first use, run via cffi.

The sources ship as package data. The shared object goes to a per-user cache directory
($XDG_CACHE_HOME/tftpd-storm, else ~/.cache/tftpd-storm; TFTPD_STORM_CACHE overrides),
named by a hash of the sources and the compiler command, so a changed source or compiler
builds anew and an unchanged one is built once. It is loaded in cffi's ABI mode (dlopen):
building needs a C compiler and libc headers, not Python's headers nor setuptools. A user
without a usable cache directory (no home) gets a build in a temporary directory, removed
at exit.
`$CC` chooses the compiler (default `cc`). `run_storm_c` has the signature and result of
pyengine.run_storm_python, plus `faults`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import resource
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tftpd.storm.content import expected
from tftpd.storm.pyengine import apply_overrides, encode_rrq, raise_nofile
from tftpd.storm.result import Faults, StormResult
from tftpd.storm.workload import Step, Workload, size_sources

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "_cgen.c", HERE / "_cgen_faults.c"]
HEADERS = [HERE / "_cgen.h", HERE / "_cgen_int.h"]
CFLAGS = ["-O2", "-Wall", "-shared", "-fPIC"]
BUILD_TIMEOUT_S = 120

REASONS = {
    1: "rrq-timeout", 2: "data-timeout", 3: "wrong-tid", 4: "corrupt", 5: "short-file",
    6: "long-file", 7: "oversize-block", 8: "bad-oack", 9: "bad-tsize", 10: "no-tsize",
    11: "no-oack", 12: "found", 13: "protocol", 14: "short-packet", 15: "send-error",
    16: "socket-error", 17: "deadline", 18: "not-started",
}
EXPECT = {"data": 0, "probe": 1, "notfound": 2}
ASK = {"blksize": 1, "tsize": 2, "windowsize": 4, "timeout": 8}


class BuildError(RuntimeError):
    """The C engine cannot be built or loaded here (no compiler, a failed build, an
    unsafe cache directory)."""


_lib: tuple[Any, Any] | None = None


def cache_dir() -> Path:
    """Where the built engine goes: per user, never shared."""
    override = os.environ.get("TFTPD_STORM_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tftpd-storm"


def _safe_dir(path: Path) -> Path:
    """Make `path` (mode 0700) if missing; refuse one that another user could write into:
    a shared object loaded from it runs as the caller."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise BuildError(f"cache directory {path}: {exc.strerror or exc}") from None
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildError(f"cache directory {path} is not owned by this user or is writable "
                         "by others; set TFTPD_STORM_CACHE to a private directory")
    return path


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "").strip() or "cc")
    if shutil.which(cc[0]) is None:
        raise BuildError(f"no C compiler ({cc[0]!r} not found; install gcc or set CC)")
    return cc


def build(force: bool = False) -> Path:
    """Compile the C core unless this user's cache holds it already; return its path."""
    cc = _compiler()
    digest = hashlib.sha256(" ".join(cc + CFLAGS).encode())
    for src in SOURCES + HEADERS:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    try:
        out_dir = _safe_dir(cache_dir())
    except BuildError as exc:
        if os.environ.get("TFTPD_STORM_CACHE"):
            raise
        # No usable home (user nobody's is /nonexistent): build for this run only.
        out_dir = Path(tempfile.mkdtemp(prefix="tftpd-storm-"))
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        print(f"tftpd-storm: {exc}; building the C engine in {out_dir} for this run",
              file=sys.stderr)
    so = out_dir / f"cgen-{digest.hexdigest()[:20]}.so"
    if so.exists() and not force:
        return so
    tmp = so.with_name(f"{so.name}.tmp{os.getpid()}")
    cmd = [*cc, *CFLAGS, "-I", str(HERE), "-o", str(tmp), *map(str, SOURCES)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"running {cc[0]} failed: {exc}") from None
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise BuildError(f"{shlex.join(cmd)} exited with {proc.returncode}"
                         + (f": {tail}" if tail else ""))
    os.replace(tmp, so)  # atomic: a concurrent run sees the old name or the whole file
    return so


def load() -> tuple[Any, Any]:
    """(ffi, lib) of the C engine, built at first use. Raises BuildError."""
    global _lib
    if _lib is None:
        try:
            import cffi
        except ImportError as exc:  # cffi is a dependency of tftpd; another Python may lack it
            raise BuildError(f"cffi is not installed for {sys.executable}") from exc
        so = build()
        ffi = cffi.FFI()
        ffi.cdef((HERE / "_cgen.h").read_text())
        try:
            lib = ffi.dlopen(str(so))
        except OSError as exc:
            raise BuildError(f"loading {so} failed: {exc}") from None
        _lib = (ffi, lib)
    return _lib


def reason_name(code: int) -> str:
    if code >= 100:
        return f"error-{code - 100}"
    return REASONS.get(code, f"reason-{code}")


def _c_steps(ffi: Any, steps: tuple[Step, ...], files: dict[str, bytes | None],
             keep: list[object]) -> Any:
    """The steps as struct tb_step[]; `keep` holds the buffers they point into."""
    csteps = ffi.new("struct tb_step[]", len(steps))
    for cs, s, source in zip(csteps, steps, size_sources(steps), strict=True):
        cs.size_from = source
        rrq = encode_rrq(s.file, s.options)
        rbuf = ffi.from_buffer(rrq)
        keep += [rrq, rbuf]
        cs.rrq = rbuf
        cs.rrq_len = len(rrq)
        cs.expect = EXPECT[s.expect]
        data = files.get(s.file) if s.expect != "notfound" else None
        if data is not None:
            dbuf = ffi.from_buffer(data)
            keep.append(dbuf)
            cs.data = dbuf
            cs.size = len(data)
            cs.known = 1
        cs.ask = sum(ASK[k] for k in s.options)
        cs.ask_blksize = s.options.get("blksize", 0)
        cs.ask_window = s.options.get("windowsize", 0)
        cs.ask_timeout = s.options.get("timeout", 0)
    return csteps


def _c_config(ffi: Any, server: tuple[str, int], workload: Workload, clients: int,
              nsteps: int, deadline_s: float, ramp_s: float, faults: Faults | None) -> Any:
    cfg = ffi.new("struct tb_config *")
    cfg.server_ip = int.from_bytes(socket.inet_aton(server[0]), "little")
    cfg.server_port = socket.htons(server[1])
    cfg.nclients = clients
    cfg.nsteps = nsteps
    cfg.ramp = ramp_s
    cfg.deadline = deadline_s
    timeouts = workload.client.rrq_timeouts_s[:16]
    for i, t in enumerate(timeouts):
        cfg.rrq_timeouts[i] = t
    cfg.n_rrq_timeouts = len(timeouts)
    cfg.ack_timeout = workload.client.ack_timeout_s
    cfg.ack_retries = workload.client.ack_retries
    rounds = 1
    if workload.repeat is not None:
        cfg.repeat_seconds = workload.repeat.seconds
        cfg.repeat_max = rounds = workload.repeat.max
    cfg.fa_cap = min(clients * nsteps * rounds, 4_000_000)  # first answers kept
    if faults:
        cfg.f_loss = faults.loss / 100.0
        cfg.f_dup = faults.dup / 100.0
        cfg.f_reorder = faults.reorder / 100.0
        cfg.f_hold_min = faults.hold_ms[0] / 1000.0
        cfg.f_hold_max = faults.hold_ms[1] / 1000.0
        cfg.f_seed = faults.seed & 0xFFFFFFFFFFFFFFFF
        cfg.f_max_held = faults.max_held
    return cfg


def _read_result(result: StormResult, ffi: Any, res: Any, out: Any, fa: Any, cap: int,
                 faults: Faults | None) -> None:
    reasons: Counter[str] = Counter()
    for i in range(result.clients):
        o = out[i]
        if o.reason:
            reasons[reason_name(o.reason)] += 1
        elif o.completion >= 0:
            result.completion_s.append(o.completion)
    n_fa = min(res.first_answers, cap)
    result.first_answer_s = list(ffi.unpack(fa, n_fa)) if n_fa else []
    result.failed = dict(reasons)
    result.wall_s = res.wall
    result.deadline_hit = bool(res.deadline_hit)
    for name in ("ok", "requests_ok", "requests_failed", "rrq_sent", "rrq_retransmits",
                 "ack_retransmits", "wrong_tid_packets", "duplicate_data", "bytes_ok"):
        setattr(result, name, int(getattr(res, name)))
    if faults:
        result.faults = faults.to_json()
        for i, way in enumerate(("sent", "received")):
            result.faults[way] = {
                "seen": res.f_seen[i], "dropped": res.f_dropped[i],
                "duplicated": res.f_duplicated[i], "held": res.f_held[i],
                "overtaken": res.f_overtaken[i], "stale": res.f_stale[i]}
        result.faults["held_peak"] = res.f_held_peak


def run_storm_c(
    server: tuple[str, int],
    workload: Workload,
    clients: int,
    *,
    files: dict[str, bytes | None] | None = None,
    deadline_s: float | None = None,
    ramp_ms: float | None = None,
    overrides: dict[str, int] | None = None,
    faults: Faults | None = None,
) -> StormResult:
    """pyengine.run_storm_python's storm, run by the C engine (built at first use)."""
    ffi, lib = load()
    files = expected(workload) if files is None else files
    steps = apply_overrides(workload, overrides)
    keep: list[object] = []
    csteps = _c_steps(ffi, steps, files, keep)
    cfg = _c_config(ffi, server, workload, clients, len(steps),
                    workload.default_deadline_s(clients) if deadline_s is None else deadline_s,
                    (workload.ramp_ms if ramp_ms is None else ramp_ms) / 1000.0, faults)
    fa = ffi.new("double[]", max(1, cfg.fa_cap))
    out = ffi.new("struct tb_client_out[]", clients)
    res = ffi.new("struct tb_result *")
    raise_nofile(clients + 256)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    rc = lib.tb_run(cfg, csteps, res, out, fa)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    del keep
    if rc != 0:
        raise OSError("tb_run failed to start (memory or epoll)")
    result = StormResult(workload=workload.name, clients=clients,
                         server=f"{server[0]}:{server[1]}", engine="c")
    _read_result(result, ffi, res, out, fa, cfg.fa_cap, faults)
    result.gen_cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return result
