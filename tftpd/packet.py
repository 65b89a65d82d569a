"""The TFTP wire codec (RFC 1350, 2347): bytes <-> packet objects, no I/O.

Every decoding failure raises `PacketError`, and only that: a worker can catch one
type and drop the datagram. Parsing is bounded (dnsmasq's lesson): a field must end
in a NUL inside the datagram, and junk after the last complete option pair is
ignored, because some clients pad their RRQ (PA-RISC firmware pads to 516 bytes,
legacy PXE ROMs put a 0xFF after the filename).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# RFC 1350 error codes, plus 8 from RFC 2347.
E_UNDEFINED = 0
E_NOT_FOUND = 1
E_ACCESS = 2
E_DISK_FULL = 3
E_ILLEGAL_OP = 4
E_UNKNOWN_TID = 5
E_EXISTS = 6
E_NO_USER = 7
E_OPTIONS = 8

MAX_DATAGRAM = 65536  # one UDP payload can never be larger
MAX_OPTIONS = 32  # more pairs than any real client sends; the rest is ignored

_HDR = struct.Struct("!HH")


class PacketError(ValueError):
    """The datagram is not a TFTP packet we can decode."""


@dataclass(frozen=True, slots=True)
class Request:
    """RRQ or WRQ. `filename` stays bytes: names are paths, not text."""

    opcode: int
    filename: bytes
    mode: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def is_write(self) -> bool:
        return self.opcode == WRQ


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OAck:
    options: dict[str, str]


Packet = Request | Data | Ack | Error | OAck


def _fields(data: bytes, start: int) -> list[bytes]:
    """Split NUL-terminated fields from `start`; an unterminated tail is dropped."""
    out = []
    pos = start
    end = len(data)
    while pos < end:
        nul = data.find(b"\0", pos)
        if nul < 0:
            break  # trailing junk without a terminator: tolerated, ignored
        out.append(data[pos:nul])
        pos = nul + 1
    return out


def _text(raw: bytes) -> str:
    # Option names, values and modes are netascii; latin-1 maps every byte so that a
    # hostile byte decodes (and is later refused) instead of raising here.
    return raw.decode("latin-1")


def _parse_options(fields: list[bytes]) -> dict[str, str]:
    options: dict[str, str] = {}
    pairs = min(len(fields) // 2, MAX_OPTIONS)
    for i in range(pairs):
        name = _text(fields[2 * i]).lower()
        if not name:
            break  # zero padding after the last option (PA-RISC clients)
        # RFC 2347 does not allow repeats; the first one wins, like tftp-hpa.
        options.setdefault(name, _text(fields[2 * i + 1]))
    return options


def parse(data: bytes) -> Packet:
    """Decode one datagram. Raises PacketError and nothing else."""
    if len(data) < 2:
        raise PacketError("datagram shorter than an opcode")
    if len(data) > MAX_DATAGRAM:
        raise PacketError("datagram too large")
    opcode = (data[0] << 8) | data[1]
    if opcode in (RRQ, WRQ):
        fields = _fields(data, 2)
        if len(fields) < 2:
            raise PacketError("request without filename and mode")
        filename = fields[0]
        if not filename:
            raise PacketError("empty filename")
        mode = _text(fields[1]).lower()
        if not mode:
            raise PacketError("empty mode")
        return Request(opcode, filename, mode, _parse_options(fields[2:]))
    if opcode == DATA:
        if len(data) < 4:
            raise PacketError("short DATA")
        return Data((data[2] << 8) | data[3], bytes(data[4:]))
    if opcode == ACK:
        if len(data) < 4:
            raise PacketError("short ACK")
        # Anything after the block number is ignored, as most servers do.
        return Ack((data[2] << 8) | data[3])
    if opcode == ERROR:
        if len(data) < 4:
            raise PacketError("short ERROR")
        code = (data[2] << 8) | data[3]
        nul = data.find(b"\0", 4)
        message = data[4:] if nul < 0 else data[4:nul]
        return Error(code, _text(message))
    if opcode == OACK:
        return OAck(_parse_options(_fields(data, 2)))
    raise PacketError(f"unknown opcode {opcode}")


def _opts_bytes(options: dict[str, str]) -> bytes:
    return b"".join(k.encode("latin-1") + b"\0" + v.encode("latin-1") + b"\0"
                    for k, v in options.items())


def encode_request(req: Request) -> bytes:
    return (struct.pack("!H", req.opcode) + req.filename + b"\0" + req.mode.encode("latin-1")
            + b"\0" + _opts_bytes(req.options))


def encode_rrq(filename: bytes | str, mode: str = "octet",
               options: dict[str, str] | None = None) -> bytes:
    name = filename.encode() if isinstance(filename, str) else filename
    return encode_request(Request(RRQ, name, mode, dict(options or {})))


def encode_wrq(filename: bytes | str, mode: str = "octet",
               options: dict[str, str] | None = None) -> bytes:
    name = filename.encode() if isinstance(filename, str) else filename
    return encode_request(Request(WRQ, name, mode, dict(options or {})))


def encode_data(block: int, payload: bytes) -> bytes:
    return _HDR.pack(DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return _HDR.pack(ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    # Messages are ours (never raw client bytes), but keep them NUL-free and short.
    text = message.replace("\0", " ")[:200]
    return _HDR.pack(ERROR, code & 0xFFFF) + text.encode("latin-1", "replace") + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    return struct.pack("!H", OACK) + _opts_bytes(options)


def encode(pkt: Packet) -> bytes:
    """Encode any packet object; parse(encode(p)) == p for well-formed p."""
    if isinstance(pkt, Request):
        return encode_request(pkt)
    if isinstance(pkt, Data):
        return encode_data(pkt.block, pkt.payload)
    if isinstance(pkt, Ack):
        return encode_ack(pkt.block)
    if isinstance(pkt, Error):
        return encode_error(pkt.code, pkt.message)
    return encode_oack(pkt.options)


ERROR_MESSAGES = {
    E_UNDEFINED: "Undefined error",
    E_NOT_FOUND: "File not found",
    E_ACCESS: "Access violation",
    E_DISK_FULL: "Disk full or allocation exceeded",
    E_ILLEGAL_OP: "Illegal TFTP operation",
    E_UNKNOWN_TID: "Unknown transfer ID",
    E_EXISTS: "File already exists",
    E_NO_USER: "No such user",
    E_OPTIONS: "Option negotiation failed",
}
