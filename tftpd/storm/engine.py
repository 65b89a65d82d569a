"""One storm, with the engine asked for: C (cgen) when it builds, else Python (pyengine)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tftpd.storm.pyengine import run_storm_python
from tftpd.storm.result import Faults, StormResult
from tftpd.storm.workload import Workload

ENGINES = ("auto", "c", "python")


def c_engine_error() -> str | None:
    """Why the C engine cannot run here (building it if needed), or None when it can."""
    from tftpd.storm import cgen

    try:
        cgen.load()
    except cgen.BuildError as exc:
        return str(exc)
    return None


def choose(engine: str, faults: Faults | None = None,
           warn: Callable[[str], object] | None = None) -> str:
    """The engine a storm runs with: "c" or "python".

    "auto" takes C when it builds and says why not otherwise (through `warn`, default
    stderr); "c" and faults require it (cgen.BuildError when it does not build).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}")
    if faults and engine == "python":
        raise ValueError("faults are injected by the C engine only")
    if engine == "python":
        return "python"
    why = c_engine_error()
    if why is None:
        return "c"
    if engine == "c" or faults:
        from tftpd.storm.cgen import BuildError

        raise BuildError(why)
    say = warn or (lambda msg: print(msg, file=sys.stderr))
    say(f"tftpd-storm: the C engine is unavailable ({why}); using the Python engine")
    return "python"


def run_storm(
    server: tuple[str, int],
    workload: Workload,
    clients: int,
    *,
    engine: str = "auto",
    files: dict[str, bytes | None] | None = None,
    deadline_s: float | None = None,
    ramp_ms: float | None = None,
    overrides: dict[str, int] | None = None,
    faults: Faults | None = None,
) -> StormResult:
    """One storm: `clients` clients of `workload` against `server` (IPv4 address, port).

    files: what a client knows of each file: its bytes, or None (unknown: the transfer
    must complete and, when tsize is asked, add up to it); default: content.expected.
    engine: "python", "c", or "auto" (C when it builds). `faults` need the C engine.
    """
    kw = dict(files=files, deadline_s=deadline_s, ramp_ms=ramp_ms, overrides=overrides)
    if choose(engine, faults) == "c":
        from tftpd.storm import cgen

        return cgen.run_storm_c(server, workload, clients, faults=faults, **kw)  # type: ignore[arg-type]
    return run_storm_python(server, workload, clients, **kw)  # type: ignore[arg-type]
