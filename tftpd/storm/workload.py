"""Boot workloads: a JSON format, loaded and checked.

A workload names the files a server root holds (path -> size), the retry rules of the
client being imitated, and the requests each client makes in order. The workloads that
come with tftpd-storm are in workloads/ beside this file; bench/README.md documents the
format and its extensions (`repeat`, `deadline_s`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

WORKLOAD_DIR = Path(__file__).resolve().parent / "workloads"
EXPECTS = ("data", "probe", "notfound")
KNOWN_OPTIONS = ("blksize", "tsize", "windowsize", "timeout")


class WorkloadError(ValueError):
    """A workload file that does not follow the format."""


@dataclass(frozen=True)
class ClientRules:
    rrq_timeouts_s: tuple[float, ...]
    ack_timeout_s: float
    ack_retries: int

    def rrq_budget_s(self) -> float:
        """Longest a request can wait for its first answer before the client gives up."""
        return float(sum(self.rrq_timeouts_s))

    def stall_budget_s(self) -> float:
        """Longest a transfer can stall before the client gives up."""
        return self.ack_timeout_s * (self.ack_retries + 1)


@dataclass(frozen=True)
class Step:
    file: str
    options: dict[str, int]
    expect: str


def size_sources(steps: tuple[Step, ...]) -> list[int]:
    """For each step, the first earlier one that asks the same file's tsize, or -1: the
    size announced there holds for this step too (mfs probes a name, then reads it
    without options). The first, because only a step with no source of its own keeps
    what it was told; the later ones are held to it."""
    sources, first = [], {}
    for i, step in enumerate(steps):
        sources.append(first.get(step.file, -1))
        if step.expect != "notfound" and "tsize" in step.options:
            first.setdefault(step.file, i)
    return sources


@dataclass(frozen=True)
class Repeat:
    """Extension: each client runs its sequence again and again, bounded in time and count."""

    seconds: float
    max: int


@dataclass(frozen=True)
class Workload:
    name: str
    files: dict[str, int]
    client: ClientRules
    sequence: tuple[Step, ...]
    clients: tuple[int, ...]
    ramp_ms: float
    repeat: Repeat | None = None
    deadline_s: float | None = None
    source: str = field(default="", compare=False)

    def bytes_per_client(self) -> int:
        return sum(self.files[s.file] for s in self.sequence if s.expect == "data")

    def default_deadline_s(self, clients: int, loss_pct: float = 0.0) -> float:
        """A bound on the wall time of one storm of this workload.

        Every client of a correct but slow server finishes well within it: each step may
        wait its full RRQ budget plus a few stalls, and the whole storm gets a floor for the
        transfer itself (1 MB/s per client is far below any server measured here). With
        packet loss, each lost DATA or ACK of a lock-step transfer may cost a timeout: the
        expected number of those (1.5 x) is added, up to 180 s in all.
        """
        if self.deadline_s is not None:
            return float(self.deadline_s)
        if loss_pct > 0:
            blocks = sum(self.files[s.file] // s.options.get("blksize", 512) + 1
                         for s in self.sequence if s.expect == "data")
            extra = 1.5 * 2 * blocks * loss_pct / 100.0 * self.client.ack_timeout_s
            return min(180.0, self.default_deadline_s(clients) + extra)
        per_step = self.client.rrq_budget_s() + 2 * self.client.stall_budget_s()
        steps = len(self.sequence)
        if self.repeat is not None:
            return self.repeat.seconds + per_step + self.ramp_ms / 1000.0
        transfer = clients * self.bytes_per_client() / 50e6
        return min(120.0, self.ramp_ms / 1000.0 + per_step * min(steps, 3) + transfer + 5.0)


def _num(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WorkloadError(f"{what}: expected a number, got {value!r}")
    return float(value)


def parse(doc: dict, source: str = "") -> Workload:
    """Check a decoded workload document and return it as a Workload."""
    if not isinstance(doc, dict):
        raise WorkloadError(f"{source or 'workload'}: a workload is a JSON object, "
                            f"not {type(doc).__name__}")
    try:
        return _parse(doc, source)
    except WorkloadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise WorkloadError(f"{source or 'workload'}: {type(exc).__name__}: {exc}") from None


def _int(value: object, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1024.0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise WorkloadError(f"{what}: expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise WorkloadError(f"{what}: expected an integer, got {value!r}") from None


def _parse(doc: dict, source: str) -> Workload:
    try:
        name = str(doc["name"])
        files_doc = doc["files"]
        client_doc = doc["client"]
        seq_doc = doc["sequence"]
        storm_doc = doc.get("storm", {"clients": [1], "ramp_ms": 0})
    except (KeyError, TypeError) as exc:
        raise WorkloadError(f"{source or 'workload'}: missing {exc}") from None
    files: dict[str, int] = {}
    for path, size in dict(files_doc).items():
        if path.startswith("/") or ".." in path.split("/") or not path:
            raise WorkloadError(f"file {path!r}: must be a relative path inside the root")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise WorkloadError(f"file {path!r}: size must be a non-negative integer")
        files[path] = size
    timeouts = tuple(_num(t, "rrq_timeouts_s") for t in client_doc["rrq_timeouts_s"])
    if not timeouts or min(timeouts) <= 0:
        raise WorkloadError("rrq_timeouts_s: need at least one positive timeout")
    rules = ClientRules(
        rrq_timeouts_s=timeouts,
        ack_timeout_s=_num(client_doc["ack_timeout_s"], "ack_timeout_s"),
        ack_retries=int(client_doc["ack_retries"]),
    )
    if rules.ack_timeout_s <= 0 or rules.ack_retries < 0:
        raise WorkloadError("ack_timeout_s must be positive and ack_retries not negative")
    steps: list[Step] = []
    for i, s in enumerate(seq_doc):
        expect = s.get("expect")
        if expect not in EXPECTS:
            raise WorkloadError(f"step {i}: expect must be one of {EXPECTS}, got {expect!r}")
        opts = {str(k): _int(v, f"step {i}: option {k}")
                for k, v in dict(s.get("options", {})).items()}
        for k in opts:
            if k not in KNOWN_OPTIONS:
                raise WorkloadError(f"step {i}: unknown option {k!r}")
        if expect == "probe" and "tsize" not in opts:
            raise WorkloadError(f"step {i}: a probe asks for tsize")
        path = str(s["file"])
        if expect in ("data", "probe") and path not in files:
            raise WorkloadError(f"step {i}: {path!r} is read but not in files")
        if expect == "notfound" and path in files:
            raise WorkloadError(f"step {i}: {path!r} is expected missing but is in files")
        steps.append(Step(file=path, options=opts, expect=expect))
    if not steps:
        raise WorkloadError("sequence is empty")
    clients = tuple(int(c) for c in storm_doc.get("clients", [1]))
    if not clients or min(clients) < 1:
        raise WorkloadError("storm.clients: need positive client counts")
    repeat = None
    if "repeat" in doc:
        r = doc["repeat"]
        repeat = Repeat(seconds=_num(r["seconds"], "repeat.seconds"), max=int(r["max"]))
        if repeat.seconds <= 0 or repeat.max < 1:
            raise WorkloadError("repeat: seconds must be positive and max at least 1")
    deadline = doc.get("deadline_s")
    return Workload(
        name=name,
        files=files,
        client=rules,
        sequence=tuple(steps),
        clients=clients,
        ramp_ms=_num(storm_doc.get("ramp_ms", 0), "storm.ramp_ms"),
        repeat=repeat,
        deadline_s=None if deadline is None else _num(deadline, "deadline_s"),
        source=source,
    )


def load(name_or_path: str | os.PathLike[str]) -> Workload:
    """Load a workload by name (`pxe`: workloads/pxe.json here) or by path."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = WORKLOAD_DIR / f"{p}.json"
        if not p.exists():
            raise WorkloadError(f"unknown workload {str(name_or_path)!r}; known: "
                                f"{', '.join(names())}, or a FILE.json")
    with open(p, encoding="utf-8") as fh:
        return parse(json.load(fh), source=str(p))


def names() -> list[str]:
    """The workloads that come with the package, by name."""
    return sorted(p.stem for p in WORKLOAD_DIR.glob("*.json"))
