"""What one fuzz example is, as plain data: the first datagram and the client's reactions.

No hypothesis here: a scenario read back from a reproduction file replays without it.
The first datagram goes to the server's listen port; after that the client behaves as a
reader would, except that at its n-th round (an OACK or a full window arrived) it applies
`reactions[n]`; when the reactions run out it finishes as `finish` says. Every loop the
runner drives is bounded by `limit_blocks` and `limit_seconds`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Reaction kinds, at one round of the transfer (the OACK, or a window of DATA):
#   ack      the right ACK
#   dup      the previous ACK again (a duplicate), then the right one
#   reorder  the right ACK, then the previous one again (reordered, stale)
#   delay    wait `arg` ms, then the right ACK
#   foreign  the right ACK from a second socket (a foreign TID), then from ours
#   error    ERROR `arg` to the server, and stop
#   junk     `data` to the server's TID (truncated, unknown opcode, ...), then the right ACK
#   bigack   the right ACK padded to `arg` bytes (an oversized datagram)
KINDS = ("ack", "dup", "reorder", "delay", "foreign", "error", "junk", "bigack")
FINISHES = ("complete", "abort")


@dataclass(frozen=True)
class Reaction:
    kind: str
    arg: int = 0
    data: bytes = b""

    def describe(self) -> str:
        if self.kind == "delay":
            return f"delay {self.arg} ms"
        if self.kind == "error":
            return f"ERROR {self.arg}"
        if self.kind == "junk":
            return f"junk {self.data!r}"
        if self.kind == "bigack":
            return f"ACK padded to {self.arg} bytes"
        return self.kind


@dataclass(frozen=True)
class Scenario:
    request: bytes
    reactions: tuple[Reaction, ...] = ()
    finish: str = "complete"
    limit_blocks: int = 400  # blocks taken before the client stops with ERROR 0
    limit_seconds: float = 6.0

    def size(self) -> tuple[int, int]:
        """Shrink order: fewer datagrams first, then fewer bytes."""
        return (len(self.reactions), len(self.request)
                + sum(len(r.data) + r.arg for r in self.reactions))

    def to_json(self) -> dict:
        return {
            "request": self.request.hex(),
            "reactions": [[r.kind, r.arg, r.data.hex()] for r in self.reactions],
            "finish": self.finish,
            "limit_blocks": self.limit_blocks,
            "limit_seconds": self.limit_seconds,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Scenario:
        reactions = []
        for kind, arg, data in obj.get("reactions", []):
            if kind not in KINDS:
                raise ValueError(f"unknown reaction {kind!r}")
            reactions.append(Reaction(str(kind), int(arg), bytes.fromhex(data)))
        finish = obj.get("finish", "complete")
        if finish not in FINISHES:
            raise ValueError(f"unknown finish {finish!r}")
        return cls(bytes.fromhex(obj["request"]), tuple(reactions), finish,
                   int(obj.get("limit_blocks", 400)), float(obj.get("limit_seconds", 6.0)))


def save(path: Path, file: str, scenario: Scenario, report: dict) -> None:
    path.write_text(json.dumps({"file": file, "scenario": scenario.to_json(), **report},
                               indent=1) + "\n")


def load(path: Path) -> tuple[str, Scenario]:
    obj = json.loads(path.read_text())
    return str(obj["file"]), Scenario.from_json(obj["scenario"])


def netascii(data: bytes) -> bytes:
    """RFC 764's NVT encoding as TFTP's netascii mode sends it: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def fields(datagram: bytes) -> list[bytes]:
    """The NUL-terminated fields after the opcode; an unterminated tail is kept too."""
    return datagram[2:].split(b"\0")[:-1] if datagram.endswith(b"\0") \
        else datagram[2:].split(b"\0")


def opcode(datagram: bytes) -> int | None:
    return int.from_bytes(datagram[:2], "big") if len(datagram) >= 2 else None


def request_options(datagram: bytes) -> dict[str, list[str]]:
    """Every option name in a request, lowercased, with every value it was given (a
    name without a value gets ""). Generous on purpose: whatever pairs a server might
    have parsed out of the datagram count as asked."""
    f = fields(datagram)[2:]
    out: dict[str, list[str]] = {}
    for i in range(0, len(f), 2):
        name = f[i].decode("latin-1").lower()
        value = f[i + 1].decode("latin-1") if i + 1 < len(f) else ""
        out.setdefault(name, []).append(value)
    return out


def oack_options(datagram: bytes) -> dict[str, str]:
    f = fields(datagram)
    out: dict[str, str] = {}
    for i in range(0, len(f) - 1, 2):
        out.setdefault(f[i].decode("latin-1").lower(), f[i + 1].decode("latin-1"))
    return out
