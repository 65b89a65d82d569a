"""Filename remapping compatible with tftp-hpa's ``in.tftpd -m FILE``.

The reference is tftp-hpa 5.2 (the last release, and what distributions ship as
5.2+20150808): ``tftpd/remap.c`` plus ``rewrite_macros()`` in ``tftpd/tftpd.c``.
This is an independent implementation of that behaviour, not a translation.

Rule file: one rule per line, ``FLAGS REGEX [REPLACEMENT]``.  Fields are separated
by unescaped whitespace; an unescaped ``#`` ends the line.  A backslash only
protects the next character from being a separator: it stays in the field and is
interpreted later by the regex (``\\ `` is a space, ``\\#`` a hash) or by the
replacement.  Fields after the third are ignored, as remap.c does.

Flags: ``r`` rewrite the match, ``g`` repeat (``r`` only) until the regex no longer
matches, each time searching the whole new string from the start; ``i``
case-insensitive; ``e`` stop after a matching rule; ``s`` start over after a
matching rule; ``a`` refuse the request; ``~`` act when the regex does *not*
match (not with ``r``); ``G``/``P`` only for read/write requests (the last of
the two letters wins); ``4``/``6`` only for IPv4/IPv6 clients.

Replacement: ``\\0``..``\\9`` the match and its groups (empty if unset), ``\\i`` the
client address, ``\\x`` the address in upper-case hex (8 digits for IPv4, 32 for
IPv6), ``\\U``/``\\L``/``\\E`` upper-/lower-case/unchanged from there on (ASCII,
like the C locale), ``\\`` before any other character yields that character (so
``\\\\`` is a backslash), and a trailing lone ``\\`` is kept.

REGEX is a POSIX extended regular expression as glibc's ``regcomp(REG_EXTENDED)``
reads it (bracket expressions with ``[:class:]``, ``[.c.]``, ``[=c=]``; intervals;
back-references ``\\1``..``\\9``; GNU ``\\w \\W \\s \\S \\b \\B \\< \\> \\` \\'``; any
other escaped character is literal).  It is translated to Python ``re`` once, at
parse time.  Matching is done on the file name's bytes (decoded as Latin-1), as
the C code does in the C locale, and finds the POSIX leftmost-*longest* match.

Deviations from remap.c 5.2, all in cases where 5.2 misbehaves:

* ``g`` repetitions are capped (:data:`MAX_GLOBAL_REPEATS` per request); 5.2 loops
  forever on a rule such as ``rg a a`` or ``rg x* y``.  Hitting the cap refuses
  the request, like the 5.2 deadman does.
* The NAK message of an ``a~`` rule with a replacement is undefined behaviour
  in 5.2 (``memcpy`` of length -1: garbage or a crash); here it is the expanded
  replacement alone.
* ``\\x`` works (5.2 under-allocates the result by 8 or 32 bytes; the text is the
  same).
* The overall match is the POSIX one, but when it can be split into groups in
  several ways the groups are Python's choice.  Seen in differential testing
  against glibc only for a group inside a repeated group that can match empty,
  e.g. ``(b|c*)+`` on ``c``: glibc gives ``\\2`` = ``c``, Python ``""``.  Patterns
  using the GNU word-boundary operators get Python's leftmost-first match.
* Lines are not split at 16384 bytes; all parse errors are reported, not logged.

Also note, *not* a deviation: "start over" (``s``) in 5.2 resumes at the second
rule (it resets its rule pointer to the first rule and then advances it).  That
is the default here; ``restart_skips_first_rule=False`` gives the documented
behaviour of the man page (and of current upstream git).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from tftpd.outside import Opener

__all__ = ["MAX_GLOBAL_REPEATS", "MAX_STEPS", "Outcome", "RemapError", "Rules"]

MAX_STEPS = 1024
"""remap.c's DEADMAN_MAX_STEPS: rule evaluations allowed per request."""

MAX_GLOBAL_REPEATS = 4096
"""Extra passes of ``g`` rules allowed per request (unbounded in 5.2)."""

TABLE_FAILURE = "Remap table failure"
"""The NAK message tftp-hpa sends when the deadman fires."""

_SPACE = frozenset(" \t\n\v\f\r")  # C isspace() in the C locale
_RE_DUP_MAX = 0x7FFF


class RemapError(ValueError):
    """A rule file that does not parse; the message says ``file:line: why``."""

    def __init__(self, errors: list[tuple[str, int, str]]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"{src}:{line}: {why}" for src, line, why in errors))


class Outcome(NamedTuple):
    """The result of one request: a file name, or a refusal.

    ``message`` is only set on refusals: the expanded replacement of an ``a`` rule
    that has one (tftp-hpa sends it in the NAK), :data:`TABLE_FAILURE` when a step
    limit was hit, and ``None`` for a bare ``a`` rule (tftp-hpa then sends the
    standard "Access violation" text).
    """

    filename: str | None
    message: str | None = None


# --------------------------------------------------------------------- regexes


class _BadRegex(Exception):
    pass


def _hx(c: int) -> str:
    return f"\\x{c:02x}"


_CLASSES: dict[str, tuple[tuple[int, int], ...]] = {
    "alpha": ((0x41, 0x5A), (0x61, 0x7A)),
    "digit": ((0x30, 0x39),),
    "alnum": ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    "upper": ((0x41, 0x5A),),
    "lower": ((0x61, 0x7A),),
    "space": ((0x09, 0x0D), (0x20, 0x20)),
    "blank": ((0x09, 0x09), (0x20, 0x20)),
    "punct": ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)),
    "print": ((0x20, 0x7E),),
    "graph": ((0x21, 0x7E),),
    "cntrl": ((0x00, 0x1F), (0x7F, 0x7F)),
    "xdigit": ((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)),
}


def _class_text(ranges: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> str:
    return "".join(_hx(lo) if lo == hi else f"{_hx(lo)}-{_hx(hi)}" for lo, hi in ranges)


_WORD = "[" + _class_text(_CLASSES["alnum"] + ((0x5F, 0x5F),)) + "]"
_NONWORD = "[^" + _WORD[1:]
_SPACES = "[" + _class_text(_CLASSES["space"]) + "]"
_NONSPACES = "[^" + _SPACES[1:]
_GNU_ESCAPES = {
    "w": _WORD, "W": _NONWORD, "s": _SPACES, "S": _NONSPACES,
    "b": r"\b", "B": r"\B", "<": r"\b(?=\w)", ">": r"\b(?<=\w)", "`": r"\A",
}
_INTERVAL = re.compile(r"\{([0-9]*)(,([0-9]*))?\}")


def _bracket_element(p: str, i: int) -> tuple[int | str, int]:
    """One bracket element at p[i]: a code point, or a class name (str)."""
    if p[i] == "[" and i + 1 < len(p) and p[i + 1] in ":.=":
        kind = p[i + 1]
        close = p.find(kind + "]", i + 2)
        if close < 0:
            raise _BadRegex("unmatched [ in a bracket expression")
        name = p[i + 2:close]
        if kind == ":":
            if name not in _CLASSES:
                raise _BadRegex(f"invalid character class name [:{name}:]")
            return name, close + 2
        if len(name) != 1:
            raise _BadRegex(f"invalid collation element [{kind}{name}{kind}]")
        return ord(name), close + 2
    return ord(p[i]), i + 1


def _bracket(p: str, i: int) -> tuple[str, int]:
    """Translate the bracket expression whose '[' is just before p[i]."""
    n = len(p)
    negate = i < n and p[i] == "^"
    if negate:
        i += 1
    ranges: list[tuple[int, int]] = []
    first = True
    while True:
        if i >= n:
            raise _BadRegex("unmatched [")
        if p[i] == "]" and not first:
            i += 1
            break
        first = False
        lo, i = _bracket_element(p, i)
        if isinstance(lo, str):
            ranges.extend(_CLASSES[lo])
            continue
        if i + 1 < n and p[i] == "-" and p[i + 1] != "]":
            hi, i = _bracket_element(p, i + 1)
            if isinstance(hi, str) or hi < lo:
                raise _BadRegex("invalid range end in a bracket expression")
            ranges.append((lo, hi))
        else:
            ranges.append((lo, lo))
    return "[" + ("^" if negate else "") + _class_text(ranges) + "]", i


@dataclass
class _Piece:
    text: str
    kind: str  # "atom" (quantifiable), "quantified", "anchor", "alt"


def _translate(p: str, dollar: str) -> tuple[str, int, bool, bool]:
    """ERE -> Python; returns (pattern, groups, could_differ_from_longest, wordb)."""
    frames: list[list[_Piece]] = [[]]
    open_groups: list[int] = []
    closed: set[int] = set()
    ngroups = 0
    ambiguous = False
    wordb = False
    i, n = 0, len(p)

    def quantify(q: str) -> None:
        pieces = frames[-1]
        if not pieces or pieces[-1].kind in ("alt", "anchor"):
            raise _BadRegex("invalid preceding regular expression")
        last = pieces[-1]
        text = f"(?:{last.text})" if last.kind == "quantified" else last.text
        pieces[-1] = _Piece(text + q, "quantified")

    while i < n:
        c = p[i]
        i += 1
        if c == "(":
            ngroups += 1
            open_groups.append(ngroups)
            frames.append([])
        elif c == ")" and open_groups:
            body = "".join(x.text for x in frames.pop())
            closed.add(open_groups.pop())
            frames[-1].append(_Piece(f"({body})", "atom"))
        elif c == "|":
            ambiguous = True
            frames[-1].append(_Piece("|", "alt"))
        elif c in "*+?":
            ambiguous = True
            quantify(c)
        elif c == "{":
            m = _INTERVAL.match(p, i - 1)
            if not m or (m.group(1) == "" and m.group(2) is None):
                raise _BadRegex("invalid content of {}")
            lo = int(m.group(1) or 0)
            hi = m.group(3)
            if lo > _RE_DUP_MAX or (hi and int(hi) > _RE_DUP_MAX):
                raise _BadRegex("regular expression too big")
            if hi and int(hi) < lo:
                raise _BadRegex("invalid content of {}")
            ambiguous = True
            quantify(f"{{{lo}{'' if m.group(2) is None else ',' + (hi or '')}}}")
            i = m.end()
        elif c == "^":
            frames[-1].append(_Piece(r"\A", "anchor"))
        elif c == "$":
            frames[-1].append(_Piece(dollar, "anchor"))
        elif c == ".":
            frames[-1].append(_Piece(r"[\x00-\xff]", "atom"))
        elif c == "[":
            text, i = _bracket(p, i)
            frames[-1].append(_Piece(text, "atom"))
        elif c == "\\":
            if i >= n:
                raise _BadRegex("trailing backslash")
            e = p[i]
            i += 1
            if e in "123456789":
                if int(e) not in closed:
                    raise _BadRegex("invalid back reference")
                ambiguous = True
                frames[-1].append(_Piece(f"(?:\\{e})", "atom"))
            elif e == "'":
                frames[-1].append(_Piece(dollar, "anchor"))
            elif e in _GNU_ESCAPES:
                kind = "atom" if e in "wWsS" else "anchor"
                wordb = wordb or e in "bB<>"
                frames[-1].append(_Piece(_GNU_ESCAPES[e], kind))
            else:
                frames[-1].append(_Piece(_hx(ord(e)), "atom"))
        else:
            frames[-1].append(_Piece(_hx(ord(c)), "atom"))
    if open_groups:
        raise _BadRegex("unmatched ( or \\(")
    body = "".join(x.text for x in frames[0])
    return f"(?:{body})", ngroups, ambiguous, wordb


class _Regex:
    """A compiled ERE that finds POSIX leftmost-longest matches."""

    __slots__ = ("rx", "rx_short", "groups", "longest")

    def __init__(self, ere: str, icase: bool) -> None:
        flags = re.ASCII | (re.IGNORECASE if icase else 0)
        full, self.groups, ambiguous, wordb = _translate(ere, r"\Z")
        try:
            self.rx = re.compile(full, flags)
            # Used with endpos < len(string), where '$' can never hold.
            self.rx_short = re.compile(_translate(ere, "(?!)")[0], flags)
        except (re.error, RecursionError, OverflowError) as exc:
            raise _BadRegex(str(exc)) from None
        self.longest = ambiguous and not wordb

    def search(self, s: str) -> re.Match[str] | None:
        m = self.rx.search(s)
        if m is None or not self.longest or m.end() == len(s):
            return m
        # Python stops at the first match found at the leftmost start; POSIX wants
        # the longest one there.  Try the longer ends, longest first.
        start = m.start()
        longer = self.rx.fullmatch(s, start)
        if longer is not None:
            return longer
        short = self.rx_short
        for end in range(len(s) - 1, m.end(), -1):
            longer = short.fullmatch(s, start, end)
            if longer is not None:
                return longer
        return m


# ---------------------------------------------------------------- replacement

_LIT, _GROUP, _CASE, _IP, _HEX = range(5)
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_Token = tuple[int, "str | int | dict[int, int] | None"]


def _compile_replacement(text: str, groups: int) -> tuple[_Token, ...]:
    tokens: list[_Token] = []
    lit: list[str] = []

    def flush() -> None:
        if lit:
            tokens.append((_LIT, "".join(lit)))
            lit.clear()

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "\\" or i + 1 == n:
            lit.append(c)
            i += 1
            continue
        e = text[i + 1]
        i += 2
        if e.isdigit() and e.isascii():
            flush()
            if int(e) <= groups:
                tokens.append((_GROUP, int(e)))
        elif e in "ULE":
            flush()
            tokens.append((_CASE, {"U": _UPPER, "L": _LOWER, "E": None}[e]))
        elif e in "ix":
            flush()
            tokens.append((_IP if e == "i" else _HEX, None))
        else:
            lit.append(e)
    flush()
    return tuple(tokens)


class _Client(NamedTuple):
    family: int  # 4, 6, or 0 when the address does not parse
    text: str
    hex: str


@functools.lru_cache(maxsize=4096)
def _client(ip: str) -> _Client:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        # Not an address (never so from the network): spelled in the same byte space
        # as the name it may be put into, so that the result always encodes.
        return _Client(0, os.fsencode(ip).decode("latin-1"), "")
    if addr.version == 4:
        return _Client(4, str(addr), f"{int(addr):08X}")
    # inet_ntop() is what tftp-hpa uses; it spells ::ffff:a.b.c.d as such.
    return _Client(6, socket.inet_ntop(socket.AF_INET6, addr.packed), addr.packed.hex().upper())


# ---------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class _Rule:
    line: int
    regex: _Regex
    replacement: tuple[_Token, ...]
    has_replacement: bool
    rewrite: bool
    repeat: bool
    exit: bool
    restart: bool
    abort: bool
    inverse: bool
    mode: str | None  # "G", "P" or None
    family: int  # 4, 6, 0 for either, -1 for neither ("46")

    def expand(self, s: str, m: re.Match[str] | None, client: _Client) -> str:
        out: list[str] = []
        table: dict[int, int] | None = None
        for kind, val in self.replacement:
            if kind == _LIT:
                piece = val
            elif kind == _GROUP:
                if m is None:
                    continue
                piece = m.group(val)  # type: ignore[arg-type]
                if piece is None:
                    continue
            elif kind == _CASE:
                table = val  # type: ignore[assignment]
                continue
            else:
                piece = client.text if kind == _IP else client.hex
            assert isinstance(piece, str)
            out.append(piece.translate(table) if table else piece)
        return "".join(out)


def _fields(line: str) -> list[str]:
    """remap.c's readescstring(), repeatedly: the line's fields up to a '#'."""
    fields: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i == n or line[i] == "#":
            return fields
        start, escaped = i, False
        while i < n and (escaped or (line[i] not in _SPACE and line[i] != "#")):
            escaped = not escaped and line[i] == "\\"
            i += 1
        fields.append(line[start:i])


def _show(s: str) -> str:
    return s.encode("latin-1").decode("utf-8", "backslashreplace")


def _parse_rule(line: str, lineno: int) -> _Rule | None:
    fields = _fields(line.split("\0", 1)[0])
    if not fields:
        return None
    flags = fields[0]
    bad = [c for c in flags if c not in "rgesai~46GP"]
    if bad:
        raise _BadRegex(f'invalid flag "{_show(bad[0])}" in "{_show(flags)}"')
    if "r" in flags and "~" in flags:
        raise _BadRegex("r rules cannot be inverted (~)")
    if len(fields) < 2:
        raise _BadRegex("no regex")
    regex = _Regex(fields[1], "i" in flags)
    modes = [c for c in flags if c in "GP"]
    family = {(False, False): 0, (True, False): 4, (False, True): 6, (True, True): -1}[
        ("4" in flags, "6" in flags)]
    return _Rule(
        line=lineno,
        regex=regex,
        replacement=_compile_replacement(fields[2] if len(fields) > 2 else "", regex.groups),
        has_replacement=len(fields) > 2,
        rewrite="r" in flags,
        repeat="g" in flags and "r" in flags,
        exit="e" in flags,
        restart="s" in flags,
        abort="a" in flags,
        inverse="~" in flags,
        mode=modes[-1] if modes else None,
        family=family,
    )


class Rules:
    """A parsed rule file; :meth:`apply` it to each request's file name."""

    def __init__(self, rules: list[_Rule], source: str, *, max_steps: int = MAX_STEPS,
                 restart_skips_first_rule: bool = True) -> None:
        self._rules = tuple(rules)
        self.source = source
        self.max_steps = max_steps
        # tftp-hpa 5.2 sets its rule pointer to the first rule and then advances
        # it, so "start over" resumes at the *second* rule.  That is what existing
        # map files were tested against, so it is the default; pass False for the
        # documented (and current upstream git) behaviour.
        self._restart_at = 1 if restart_skips_first_rule else 0

    def __len__(self) -> int:
        return len(self._rules)

    @classmethod
    def parse(cls, text: str, source: str = "<map>", **kwargs: int | bool) -> Rules:
        # The C code works on bytes; so do we, one str character per byte.
        return cls._parse_bytes(text.encode("utf-8", "surrogateescape"), source, **kwargs)

    @classmethod
    def load(cls, path: str, opener: Opener | None = None, **kwargs: int | bool) -> Rules:
        """The rules in the file at `path` (opened through `opener` when given)."""
        with open(path, "rb", opener=opener) as f:
            data = f.read()
        return cls._parse_bytes(data, path, **kwargs)

    @classmethod
    def _parse_bytes(cls, data: bytes, source: str, **kwargs: int | bool) -> Rules:
        rules: list[_Rule] = []
        errors: list[tuple[str, int, str]] = []
        lines = data.decode("latin-1").split("\n")
        for lineno, line in enumerate(lines, 1):
            if lineno < len(lines):
                line += "\n"  # fgets() keeps it: a backslash at the end escapes it
            try:
                rule = _parse_rule(line, lineno)
            except _BadRegex as exc:
                errors.append((source, lineno, str(exc)))
                continue
            if rule is not None:
                rules.append(rule)
        if errors:
            raise RemapError(errors)
        return cls(rules, source, **kwargs)  # type: ignore[arg-type]

    def apply(self, filename: str, client_ip: str, is_write: bool) -> str | None:
        """The rewritten name, or None when the request is refused."""
        return self.evaluate(filename, client_ip, is_write).filename

    def evaluate(self, filename: str, client_ip: str, is_write: bool) -> Outcome:
        """Like :meth:`apply`, with the refusal message tftp-hpa would send."""
        s = os.fsencode(filename).decode("latin-1")
        client = _client(client_ip)
        mode = "P" if is_write else "G"
        rules = self._rules
        steps = self.max_steps
        repeats = MAX_GLOBAL_REPEATS
        i = 0
        while i < len(rules):
            rule = rules[i]
            if (rule.mode is not None and rule.mode != mode) or (
                    rule.family and rule.family != client.family):
                i += 1
                continue
            if steps <= 0:
                return Outcome(None, TABLE_FAILURE)
            steps -= 1
            matched = False
            while True:
                m = rule.regex.search(s)
                if (m is None) != rule.inverse:
                    break
                matched = True
                if rule.abort:
                    return Outcome(None, self._abort_message(rule, s, m, client))
                if rule.rewrite:
                    assert m is not None
                    s = s[:m.start()] + rule.expand(s, m, client) + s[m.end():]
                if not rule.repeat:
                    break
                if repeats <= 0:
                    return Outcome(None, TABLE_FAILURE)
                repeats -= 1
            if matched and rule.exit:
                break
            if matched and rule.restart:
                i = self._restart_at
                continue
            i += 1
        return Outcome(os.fsdecode(s.encode("latin-1")))

    @staticmethod
    def _abort_message(rule: _Rule, s: str, m: re.Match[str] | None,
                       client: _Client) -> str | None:
        if not rule.has_replacement:
            return None
        text = rule.expand(s, m, client)
        if m is not None:  # 5.2 keeps the text around the match, as for a rewrite
            text = s[:m.start()] + text + s[m.end():]
        return os.fsdecode(text.encode("latin-1"))

    def __repr__(self) -> str:
        return f"<Rules {self.source!r}: {len(self._rules)} rules>"
