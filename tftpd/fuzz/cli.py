"""tftpd-fuzz: check any TFTP server against the RFCs with generated requests and clients.

    tftpd-fuzz [--seconds N] [--examples N] [--seed N] HOST:PORT FILE
    tftpd-fuzz --replay REPRO.json HOST:PORT

FILE must be a file the server serves: it is first read plainly (RRQ, octet, no options)
and that copy is the oracle every DATA block is compared with. Exit status: 0 nothing
found, 1 a violation (printed, shrunk, saved for --replay), 2 usage error or the server
could not be reached (the oracle read failed).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from tftpd import client
from tftpd.fuzz import checks, runner
from tftpd.fuzz.scenario import Reaction, Scenario, load, netascii, save

SHRINK_MIN, SHRINK_MAX = 10.0, 60.0  # s of shrinking after the search finds something


@dataclass
class Found:
    scenario: Scenario
    trace: runner.Trace
    violations: list[checks.Violation]
    note: str = ""


@dataclass
class Target:
    host: str
    port: int
    file: str
    oracle: bytes
    oracle_netascii: bytes = b""
    examples: int = 0
    best: Found | None = None
    dead: bool = False
    notes: list[str] = field(default_factory=list)
    ignore: frozenset[str] = frozenset()
    last_trace: runner.Trace = field(default_factory=runner.Trace)

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def judge(self, sc: Scenario) -> Found | None:
        """Run one scenario, check it, check the server still answers."""
        self.examples += 1
        trace = self.last_trace = runner.run(self.host, self.port, sc)
        vs = [v for v in checks.check(trace, sc.request, self.file, self.oracle,
                                      self.oracle_netascii) if v.clause not in self.ignore]
        note = ""
        if not runner.alive(self.host, self.port, self.file):
            self.dead = True  # nothing more can be learnt from it
            if "liveness" in self.ignore:
                self.notes.append(f"the server stopped answering after example "
                                  f"{self.examples}: search ended")
            else:
                vs.append(checks.Violation("liveness", "no answer to a plain RRQ within 2 s "
                                           "after this example"))
                note = "not shrunk: the server stopped answering"
        return Found(sc, trace, vs, note) if vs else None


class _Violation(Exception):
    pass


class _TimeUp(BaseException):
    """Ends hypothesis's run at once: a BaseException is not a failure to shrink."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tftpd-fuzz", description="Conformance fuzzer for a TFTP server (RFC 1350, "
        "2347, 2348, 2349, 7440, 1123). Exit 0: nothing found; 1: a violation; 2: usage "
        "error or server unreachable.")
    ap.add_argument("target", metavar="HOST:PORT", help="the server; [V6ADDR]:PORT for IPv6")
    ap.add_argument("file", metavar="FILE", nargs="?",
                    help="a file the server serves (not with --replay)")
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="search this long (default 60); shrinking a find takes up to "
                    "--shrink-seconds more")
    ap.add_argument("--shrink-seconds", type=float,
                    help="shrink a find this long at most (default: half of --seconds, "
                    "10 to 60)")
    ap.add_argument("--examples", type=int, default=100000,
                    help="at most this many examples (default 100000)")
    ap.add_argument("--seed", type=int, help="hypothesis seed (default: random, printed)")
    ap.add_argument("--no-corpus", action="store_true",
                    help="skip the fixed requests of real clients tried first; random only")
    ap.add_argument("--ignore", metavar="CLAUSE", action="append", default=[],
                    choices=sorted(checks.CLAUSES),
                    help="do not report this clause (a known violation); repeatable")
    ap.add_argument("--replay", metavar="REPRO.json", help="replay a saved reproduction")
    ap.add_argument("--save", metavar="PATH", help="where to write the reproduction "
                    "(default: a new file in the temporary directory)")
    ap.add_argument("--database", metavar="DIR", help="keep hypothesis's example database "
                    "in DIR (default: none; nothing is written to the current directory)")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        ns = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help 0
        return int(exc.code or 0)
    try:
        host, port = runner.parse_hostport(ns.target)
        runner.resolve(host, port)
    except (ValueError, OSError) as exc:
        print(f"tftpd-fuzz: bad address {ns.target!r}: {exc}", file=sys.stderr)
        return 2
    if ns.seconds <= 0 or ns.examples <= 0:
        print("tftpd-fuzz: --seconds and --examples must be positive", file=sys.stderr)
        return 2
    replay: Scenario | None = None
    if ns.replay:
        try:
            file, replay = load(Path(ns.replay))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"tftpd-fuzz: cannot read {ns.replay}: {exc}", file=sys.stderr)
            return 2
        if ns.file and ns.file != file:
            print(f"tftpd-fuzz: {ns.replay} is for file {file!r}", file=sys.stderr)
            return 2
    elif not ns.file:
        print("tftpd-fuzz: FILE is required (a file the server serves)", file=sys.stderr)
        return 2
    else:
        file = ns.file
    if replay is None:
        from tftpd.fuzz import HYPOTHESIS_MISSING
        if HYPOTHESIS_MISSING:
            print("tftpd-fuzz needs hypothesis: pip install 'tftpd[fuzz]' "
                  f"(or pip install hypothesis); {HYPOTHESIS_MISSING}", file=sys.stderr)
            return 2
    try:
        oracle = client.get(host, port, file, timeout=1.0, retries=2).data
    except (client.TftpError, OSError) as exc:
        print(f"tftpd-fuzz: cannot read {file!r} from {ns.target} (plain RRQ, octet): {exc}",
              file=sys.stderr)
        return 2
    target = Target(host, port, file, oracle, netascii(oracle), ignore=frozenset(ns.ignore))
    if replay is not None:
        found = target.judge(replay)
        if found is None:
            print(f"tftpd-fuzz: replayed {ns.replay} against {target.addr}: no violation")
            print(checks.render(runner.run(host, port, replay).events))
            return 0
        _report(target, found, ns, saved=None)
        return 1
    return _fuzz(target, ns)


def _rollover(target: Target, budget: float) -> Found | None:
    """One transfer past block 65535 with a small blksize, if FILE is big enough."""
    blocks = 65536 + 8
    blksize = len(target.oracle) // blocks
    if blksize < 8:
        target.notes.append(f"rollover not tried: {target.file} has {len(target.oracle)} "
                            f"bytes, {8 * blocks} needed at blksize 8")
        return None
    if budget < 5:
        target.notes.append("rollover not tried: --seconds too small")
        return None
    req = (b"\0\1" + target.file.encode() + b"\0octet\0blksize\0"
           + str(blksize).encode() + b"\0")
    sc = Scenario(req, (), "complete", limit_blocks=blocks + 8, limit_seconds=budget)
    found = target.judge(sc)
    top = max((e.block or 0 for e in target.last_trace.events if not e.out), default=0)
    if found is None:
        target.notes.append(
            f"rollover: one transfer at blksize {blksize} went past block 65535 to block "
            f"{top}, checked" if top > 65535 else
            f"rollover: not reached, the transfer at blksize {blksize} got to block {top} "
            f"in {budget:.0f} s")
    return found


def _fuzz(target: Target, ns: argparse.Namespace) -> int:
    from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
    from hypothesis import seed as hseed
    from hypothesis.configuration import set_hypothesis_home_dir
    from hypothesis.database import DirectoryBasedExampleDatabase
    from hypothesis.errors import HypothesisWarning

    from tftpd.fuzz.strategies import corpus, scenarios

    home = tempfile.mkdtemp(prefix="tftpd-fuzz-")
    set_hypothesis_home_dir(home)  # never a surprise .hypothesis in the cwd
    seed = ns.seed if ns.seed is not None else random.randrange(2 ** 32)
    start = time.monotonic()
    print(f"tftpd-fuzz: {target.addr} file {target.file!r} ({len(target.oracle)} bytes), "
          f"seed {seed}, {ns.seconds:g} s", flush=True)
    found = _rollover(target, min(30.0, ns.seconds / 3))
    if found is not None:
        target.best = found
    stop_at = start + ns.seconds
    shrink_for = ns.shrink_seconds if ns.shrink_seconds is not None \
        else min(SHRINK_MAX, max(SHRINK_MIN, ns.seconds / 2))
    shrink_stop = [float("inf")]

    def body(sc: Scenario) -> None:
        now = time.monotonic()
        if target.dead or now > shrink_stop[0] or (target.best is None and now > stop_at):
            raise _TimeUp
        f = target.judge(sc)
        if f is None:
            return
        if target.best is None:
            shrink_stop[0] = time.monotonic() + shrink_for
        if target.best is None or target.dead or sc.size() < target.best.scenario.size():
            target.best = f
        raise _Violation(f.violations[0].clause)

    db = DirectoryBasedExampleDatabase(ns.database) if ns.database else None
    test = settings(max_examples=ns.examples, database=db, deadline=None,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                    verbosity=Verbosity.quiet, print_blob=False,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    )(given(scenarios(target.file))(body))
    for sc in [] if ns.no_corpus else reversed(corpus(target.file)):
        test = example(sc)(test)
    test = hseed(seed)(test)
    if target.best is None:
        try:
            with warnings.catch_warnings():
                # e.g. "overly large repr" of a 60 KB request: ours to print, not hypothesis's
                warnings.simplefilter("ignore", HypothesisWarning)
                test()
        except _TimeUp:
            pass
        except Exception as exc:  # noqa: BLE001 - ours, or hypothesis's Flaky about it
            if target.best is None:
                print(f"tftpd-fuzz: internal error: {exc!r}", file=sys.stderr)
                shutil.rmtree(home, ignore_errors=True)
                return 2
    shutil.rmtree(home, ignore_errors=True)
    if target.best is not None and not target.dead:
        # The rest of the shrinking time, or all of it if the rollover transfer found it.
        until = shrink_stop[0] if shrink_stop[0] < float("inf") else time.monotonic() + shrink_for
        target.best = _minimise(target, target.best, max(until, time.monotonic() + 1))
    took = time.monotonic() - start
    if target.best is None:
        print(f"tftpd-fuzz: {target.examples} examples in {took:.1f} s, no violation")
        for note in target.notes:
            print(f"  {note}")
        return 0
    saved = Path(ns.save) if ns.save else Path(tempfile.mkstemp(
        prefix="tftpd-fuzz-repro-", suffix=".json")[1])
    _report(target, target.best, ns, saved=saved, seed=seed, took=took)
    return 1


def _minimise(target: Target, found: Found, until: float) -> Found:
    """Greedy shrinking on top of hypothesis's (which does not shrink the fixed corpus):
    drop reactions, make them plain ACKs, stop early, while the same clause still fails."""
    clause = found.violations[0].clause
    best = found
    for _ in range(50):
        sc = best.scenario
        cands = [replace(sc, finish="abort")] if sc.finish != "abort" else []
        cands += [replace(sc, reactions=sc.reactions[:i] + sc.reactions[i + 1:])
                  for i in range(len(sc.reactions))]
        cands += [replace(sc, reactions=sc.reactions[:i] + (Reaction("ack"),)
                          + sc.reactions[i + 1:])
                  for i, r in enumerate(sc.reactions) if r.kind != "ack"]
        for cand in cands:
            if time.monotonic() > until or target.dead:
                return best
            f = target.judge(cand)
            if f is not None and any(v.clause == clause for v in f.violations):
                best = f
                break
        else:
            return best
    return best


def _report(target: Target, f: Found, ns: argparse.Namespace, saved: Path | None,
            seed: int | None = None, took: float = 0.0) -> None:
    vs = "\n".join(f"  {v}" for v in f.violations)
    head = f"tftpd-fuzz: VIOLATION by {target.addr} (file {target.file!r}"
    head += f", {target.examples} examples in {took:.1f} s, seed {seed})" if seed is not None \
        else ", replayed)"
    print(head)
    print(vs)
    if f.note:
        print(f"  ({f.note})")
    sc = f.scenario
    print(f"request: {sc.request[:200]!r}" + (f" + {len(sc.request) - 200} more bytes"
                                               if len(sc.request) > 200 else ""))
    print("client reactions, one per round: "
          + (", ".join(r.describe() for r in sc.reactions) or "none")
          + f"; then {sc.finish}")
    print("datagrams (time since the request, direction, bytes):")
    events = f.trace.events
    shown = events if len(events) <= 80 else events[:40] + events[-40:]
    print(checks.render(shown))
    if len(events) > 80:
        print(f"  ... {len(events) - 80} datagrams in the middle not shown")
    if saved is not None:
        save(saved, target.file, sc, {"violations": [
            {"clause": v.clause, "what": v.what, "rfc": checks.CLAUSES[v.clause]}
            for v in f.violations], "server": target.addr})
        print(f"replay: tftpd-fuzz --replay {saved} {target.addr}")


if __name__ == "__main__":
    raise SystemExit(main())
