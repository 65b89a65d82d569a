"""Option negotiation (RFC 2347, 2348, 2349, 7440) as one pure function.

A table of handlers in the tftp-hpa shape: each handler sees the client's value and
the server's policy and either accepts a value (echoed in the OACK) or declines
(returns None: the option is simply left out). Invalid values are ignored, never
fatal; unknown options never fail a transfer. Only options the client asked for can
appear in the OACK, and the order of the table is the order of evaluation
(windowsize after blksize).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464  # RFC 2348
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255  # RFC 2349
WINDOW_MIN, WINDOW_MAX = 1, 65535  # RFC 7440
DEFAULT_BLKSIZE = 512  # RFC 1350
KNOWN = ("blksize", "tsize", "timeout", "windowsize")


@dataclass(frozen=True, slots=True)
class Policy:
    """What the server allows; built once from the configuration."""

    max_blksize: int = BLKSIZE_MAX
    max_windowsize: int = 64
    # A window is one burst; a receiver's socket buffer must hold it. Linux's default
    # (208 KiB of buffer, counted with overhead) holds about 128 KiB of payload.
    max_window_bytes: int = 128 * 1024
    refused: frozenset[str] = frozenset()
    max_upload: int | None = None


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The result: the values the transfer runs with, and the OACK to send."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: int | None = None  # seconds the client asked for, None: adaptive
    tsize: int | None = None  # announced upload size on WRQ
    oack: dict[str, str] = field(default_factory=dict)


class OptionRefused(ValueError):
    """The request's options cannot be honoured (RFC 2347: ERROR 8)."""


def _int(value: str) -> int | None:
    # Decimal digits only: "0x10", "+5", " 5" and "" are invalid and the option is
    # ignored rather than failing the request.
    if not value or len(value) > 20 or not value.isascii() or not value.isdigit():
        return None
    return int(value)


@dataclass(slots=True)
class _Facts:
    size: int | None
    is_write: bool
    mtu_blksize: int | None


Handler = Callable[[str, Policy, _Facts, dict[str, int]], int | None]


def _blksize(value: str, policy: Policy, facts: _Facts, chosen: dict[str, int]) -> int | None:
    n = _int(value)
    if n is None or n < BLKSIZE_MIN:
        return None
    # Never answer a blksize larger than asked (U-Boot rejects that), and never one
    # that would fragment on the interface the request came in on.
    limit = min(BLKSIZE_MAX, policy.max_blksize)
    if facts.mtu_blksize is not None:
        limit = min(limit, facts.mtu_blksize)
    return max(BLKSIZE_MIN, min(n, limit))


def _tsize(value: str, policy: Policy, facts: _Facts, chosen: dict[str, int]) -> int | None:
    n = _int(value)
    if n is None:
        return None
    if facts.is_write:
        if policy.max_upload is not None and n > policy.max_upload:
            raise OptionRefused(f"upload of {n} bytes exceeds the limit")
        return n
    # RRQ: the client sends 0 and we answer the true size (RFC 2349).
    return facts.size


def _timeout(value: str, policy: Policy, facts: _Facts, chosen: dict[str, int]) -> int | None:
    n = _int(value)
    # Echoed exactly or not at all: U-Boot refuses an OACK whose timeout differs.
    if n is None or not TIMEOUT_MIN <= n <= TIMEOUT_MAX:
        return None
    return n


def _windowsize(value: str, policy: Policy, facts: _Facts, chosen: dict[str, int]) -> int | None:
    n = _int(value)
    if n is None or n < WINDOW_MIN:
        return None
    # RFC 7440 lets the server answer a smaller window. 16 blocks of 65464 bytes (1 MiB in
    # one burst) overflow a default receive buffer every round: measured, 63 MB/s against
    # 735 for a server that happens to pace its sends.
    by_bytes = policy.max_window_bytes // chosen.get("blksize", DEFAULT_BLKSIZE)
    return min(n, WINDOW_MAX, max(1, policy.max_windowsize), max(1, by_bytes))


# Evaluation order matters: windowsize may one day depend on the chosen blksize.
_TABLE: tuple[tuple[str, Handler], ...] = (
    ("blksize", _blksize),
    ("tsize", _tsize),
    ("timeout", _timeout),
    ("windowsize", _windowsize),
)


def negotiate(requested: dict[str, str], policy: Policy, *, size: int | None = None,
              is_write: bool = False, mtu_blksize: int | None = None) -> Negotiated:
    """Accepted options for `requested` under `policy`.

    `size` is the size the client will receive (after netascii conversion) for RRQ.
    Raises OptionRefused only for a WRQ whose announced size exceeds the upload limit.
    """
    facts = _Facts(size, is_write, mtu_blksize)
    chosen: dict[str, int] = {}
    for name, handler in _TABLE:
        if name not in requested or name in policy.refused:
            continue
        value = handler(requested[name], policy, facts, chosen)
        if value is not None:
            chosen[name] = value
    return Negotiated(
        blksize=chosen.get("blksize", DEFAULT_BLKSIZE),
        windowsize=chosen.get("windowsize", 1),
        timeout=chosen.get("timeout"),
        tsize=chosen.get("tsize") if is_write else None,
        # The OACK keeps the client's order of options, as tftp-hpa does.
        oack={k: str(chosen[k]) for k in requested if k in chosen},
    )
