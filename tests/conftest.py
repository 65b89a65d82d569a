"""Shared fixtures: the real daemon as a subprocess on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Properties, not stopwatches: a loaded CI machine must not fail a test because
# hypothesis drew its examples slowly or one example ran long (seen in CI: "input
# generation is slow" on test_options). The examples themselves are unchanged.
#
# Two profiles. `ci` (the default) keeps the example counts that fit CI's time. `deep`
# (HYPOTHESIS_PROFILE=deep, or pytest's --hypothesis-profile=deep) runs DEEP_FACTOR
# times as many: over a million examples in all (docs/testing.md). A test's own count is
# written `scaled(n)`, never a bare number, so no test caps the deep run; a test whose
# examples are slow (syscalls on real sockets, backtracking regexes) takes a smaller
# multiplier, `scaled(n, deep=DEEP_IO)`, so that the deep run takes minutes, not days.
CI_EXAMPLES = 100  # hypothesis' own default
DEEP_FACTOR = 500
DEEP_IO = 20  # for tests whose every example is syscalls on sockets
_common: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=CI_EXAMPLES, **_common)
settings.register_profile("deep", max_examples=CI_EXAMPLES * DEEP_FACTOR, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(n: int, deep: int = DEEP_FACTOR) -> int:
    """A test's example count: `n` under the ci profile, up to `deep` times n under deep.

    The factor is the loaded profile's max_examples over ci's, read when the test module
    is imported, after pytest's --hypothesis-profile (if given) has loaded its profile.
    """
    factor = max(1, settings.default.max_examples // CI_EXAMPLES)
    return n * min(factor, deep)

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT = 20.0  # s; a cold interpreter on a loaded CI machine


@dataclass
class Daemon:
    proc: subprocess.Popen
    host: str
    port: int
    root: Path
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Block until `count` log lines match `pattern` (a regex); return them."""
        rx = re.compile(pattern)
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len([ln for ln in self.lines if rx.search(ln)]) >= count, timeout)
            found = [ln for ln in self.lines if rx.search(ln)]
        if not ok:
            raise AssertionError(f"no {count} log line(s) matching {pattern!r} in "
                                 f"{timeout}s; log so far:\n" + "\n".join(self.lines[-40:]))
        return found

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def wait_workers(self, n: int, timeout: float = 5.0,
                     exclude: frozenset[int] = frozenset()) -> list[int]:
        """Poll the process table (bounded) until the master has `n` workers, none in
        `exclude`. The master prints "listening on" before it forks, so right after
        start_daemon the pool may still be forming."""
        deadline = time.monotonic() + timeout
        while True:
            pids = sorted(self.worker_pids())
            if (len(pids) == n and not exclude & set(pids)) or time.monotonic() > deadline:
                assert len(pids) == n and not exclude & set(pids), \
                    f"workers {pids}, want {n} of them, none of {sorted(exclude)}"
                return pids
            time.sleep(0.01)  # bounded polling of process state

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print("daemon did not stop; its log:\n" + self.log_text()[-3000:])
            subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:20,args", "-g",
                            str(self.proc.pid)], check=False)
            # The daemon has a session of its own: take its workers down with it.
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        if self._reader:
            self._reader.join(5)
        return rc


def start_daemon(root: Path, *args: str, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> Daemon:
    """Start `python -m tftpd -L` on an ephemeral port; return once it listens."""
    addr = f"[{host}]:0" if ":" in host else f"{host}:0"
    cmd = [sys.executable, "-m", "tftpd", "-L", "-a", addr, *args, str(root)]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=full_env, cwd=REPO, start_new_session=True)
    d = Daemon(proc, host, 0, root)
    d._reader = threading.Thread(target=d._read, daemon=True)
    d._reader.start()
    try:
        line = d.wait_for_log(r"listening on", timeout=START_TIMEOUT)[0]
    except AssertionError:
        d.stop(signal.SIGKILL)
        raise
    m = READY.search(line)
    assert m, line
    d.port = int(m.group(2))
    return d


# CI builds the extension and sets this: a test that needs it fails rather than skips.
REQUIRE_EXT = os.environ.get("TFTPD_REQUIRE_EXT", "").strip().lower() not in (
    "", "0", "no", "false"
)


def need_ext(why: str = "") -> None:
    """Skip, saying why, when the C data path is not built; fail instead under CI."""
    from tftpd.datapath import ext_error

    reason = ext_error()
    if reason is None:
        return
    if REQUIRE_EXT:
        pytest.fail(f"TFTPD_REQUIRE_EXT is set but {reason}")
    pytest.skip(f"{why}{reason}")


def datapaths() -> list[str]:
    """The data paths to run the protocol over: both when the extension is built."""
    from tftpd.datapath import ext_error

    return ["python"] if ext_error() and not os.environ.get("TFTPD_REQUIRE_EXT") \
        else ["c", "python"]


@pytest.fixture(params=datapaths())
def datapath(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def daemon(root: Path, datapath: str) -> Iterator[Daemon]:
    d = start_daemon(root, "--workers", "2", env={"TFTPD_DATAPATH": datapath})
    try:
        yield d
    finally:
        d.stop()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it with apt)")
    return path
