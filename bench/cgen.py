"""The load generator's C core (bench/_cgen.c), built through cffi at first use.

The module is compiled into bench/.build/cgen/ (never committed) when it is missing or
older than its sources; `run_storm_c` then has the signature and result of
bench.loadgen.run_storm_python.
"""

from __future__ import annotations

import resource
import socket
from collections import Counter
from pathlib import Path
from types import ModuleType

from bench.build import BUILD_DIR, build_cffi, load_cffi
from bench.content import expected
from bench.loadgen import Faults, StormResult, _raise_nofile, apply_overrides, encode_rrq
from bench.workload import Workload

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "_cgen.c", HERE / "_cgen.h"]
MODNAME = "_tftpbench_cgen"
OUT_DIR = BUILD_DIR / "cgen"

REASONS = {
    1: "rrq-timeout", 2: "data-timeout", 3: "wrong-tid", 4: "corrupt", 5: "short-file",
    6: "long-file", 7: "oversize-block", 8: "bad-oack", 9: "bad-tsize", 10: "no-tsize",
    11: "no-oack", 12: "found", 13: "protocol", 14: "short-packet", 15: "send-error",
    16: "socket-error", 17: "deadline", 18: "not-started",
}
EXPECT = {"data": 0, "probe": 1, "notfound": 2}
ASK = {"blksize": 1, "tsize": 2, "windowsize": 4, "timeout": 8}

_mod: ModuleType | None = None


def _cdef() -> str:
    return (HERE / "_cgen.h").read_text()


def build(force: bool = False) -> Path:
    """Compile the C core if needed; return the path of the extension module."""
    return build_cffi(MODNAME, _cdef(), '#include <stdint.h>\n#include "_cgen.h"\n',
                      [HERE / "_cgen.c"], SOURCES, OUT_DIR, "the C load generator",
                      force=force)


def load_module() -> ModuleType:
    global _mod
    if _mod is None:
        _mod = load_cffi(MODNAME, build())
    return _mod


def reason_name(code: int) -> str:
    if code >= 100:
        return f"error-{code - 100}"
    return REASONS.get(code, f"reason-{code}")


def run_storm_c(
    server: tuple[str, int],
    workload: Workload,
    clients: int,
    *,
    files: dict[str, bytes] | None = None,
    deadline_s: float | None = None,
    ramp_ms: float | None = None,
    overrides: dict[str, int] | None = None,
    faults: Faults | None = None,
) -> StormResult:
    mod = load_module()
    ffi, lib = mod.ffi, mod.lib
    files = expected(workload) if files is None else files
    steps = apply_overrides(workload, overrides)
    keep: list[object] = []
    csteps = ffi.new("struct tb_step[]", len(steps))
    for i, s in enumerate(steps):
        rrq = encode_rrq(s.file, s.options)
        rbuf = ffi.from_buffer(rrq)
        keep.append(rrq)
        keep.append(rbuf)
        cs = csteps[i]
        cs.rrq = rbuf
        cs.rrq_len = len(rrq)
        cs.expect = EXPECT[s.expect]
        if s.expect != "notfound":
            data = files[s.file]
            dbuf = ffi.from_buffer(data)
            keep.append(dbuf)
            cs.data = dbuf
            cs.size = len(data)
        ask = 0
        for k in s.options:
            ask |= ASK[k]
        cs.ask = ask
        cs.ask_blksize = s.options.get("blksize", 0)
        cs.ask_window = s.options.get("windowsize", 0)
        cs.ask_timeout = s.options.get("timeout", 0)
    cfg = ffi.new("struct tb_config *")
    cfg.server_ip = int.from_bytes(socket.inet_aton(server[0]), "little")
    cfg.server_port = socket.htons(server[1])
    cfg.nclients = clients
    cfg.nsteps = len(steps)
    cfg.ramp = (workload.ramp_ms if ramp_ms is None else ramp_ms) / 1000.0
    cfg.deadline = workload.default_deadline_s(clients) if deadline_s is None else deadline_s
    timeouts = workload.client.rrq_timeouts_s[:16]
    for i, t in enumerate(timeouts):
        cfg.rrq_timeouts[i] = t
    cfg.n_rrq_timeouts = len(timeouts)
    cfg.ack_timeout = workload.client.ack_timeout_s
    cfg.ack_retries = workload.client.ack_retries
    if workload.repeat is not None:
        cfg.repeat_seconds = workload.repeat.seconds
        cfg.repeat_max = workload.repeat.max
        cap = clients * len(steps) * workload.repeat.max
    else:
        cap = clients * len(steps)
    cap = min(cap, 4_000_000)
    cfg.fa_cap = cap
    if faults:
        cfg.f_loss = faults.loss / 100.0
        cfg.f_dup = faults.dup / 100.0
        cfg.f_reorder = faults.reorder / 100.0
        cfg.f_hold_min = faults.hold_ms[0] / 1000.0
        cfg.f_hold_max = faults.hold_ms[1] / 1000.0
        cfg.f_seed = faults.seed & 0xFFFFFFFFFFFFFFFF
        cfg.f_max_held = faults.max_held
    fa = ffi.new("double[]", max(1, cap))
    out = ffi.new("struct tb_client_out[]", clients)
    res = ffi.new("struct tb_result *")
    _raise_nofile(clients + 256)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    rc = lib.tb_run(cfg, csteps, res, out, fa)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if rc != 0:
        raise OSError("tb_run failed to start (memory or epoll)")
    result = StormResult(workload=workload.name, clients=clients,
                         server=f"{server[0]}:{server[1]}", engine="c")
    reasons: Counter[str] = Counter()
    for i in range(clients):
        o = out[i]
        if o.reason:
            reasons[reason_name(o.reason)] += 1
        elif o.completion >= 0:
            result.completion_s.append(o.completion)
    n_fa = min(res.first_answers, cap)
    result.first_answer_s = list(ffi.unpack(fa, n_fa)) if n_fa else []
    result.ok = res.ok
    result.failed = dict(reasons)
    result.wall_s = res.wall
    result.requests_ok = res.requests_ok
    result.requests_failed = res.requests_failed
    result.rrq_sent = res.rrq_sent
    result.rrq_retransmits = res.rrq_retransmits
    result.ack_retransmits = res.ack_retransmits
    result.wrong_tid_packets = res.wrong_tid_packets
    result.duplicate_data = res.duplicate_data
    result.bytes_ok = res.bytes_ok
    result.deadline_hit = bool(res.deadline_hit)
    if faults:
        result.faults = faults.to_json()
        for i, way in enumerate(("sent", "received")):
            result.faults[way] = {
                "seen": res.f_seen[i], "dropped": res.f_dropped[i],
                "duplicated": res.f_duplicated[i], "held": res.f_held[i],
                "overtaken": res.f_overtaken[i], "stale": res.f_stale[i]}
        result.faults["held_peak"] = res.f_held_peak
    result.gen_cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    del keep
    return result
