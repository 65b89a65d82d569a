"""The OPTIONS and ENVIRONMENT of tftpd(8) and the SETTINGS of tftpd.conf(5), made from
config.SETTINGS and config.ENVIRONMENT.

`python3 -m tftpd.manpage` rewrites the generated parts of man/tftpd.8 and
man/tftpd.conf.5 in place; a test fails when the pages and the settings drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tftpd.config import ENVIRONMENT, SETTINGS, Setting

MAN = Path(__file__).resolve().parent.parent / "man"
BEGIN = '.\\" BEGIN GENERATED {} (python3 -m tftpd.manpage)'
END = '.\\" END GENERATED {}'


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _default(s: Setting) -> str:
    if s.count or s.convert is None or s.repeat or s.default in (None, ()):
        return ""
    value = oct(s.default)[2:].zfill(3) if s.name == "umask" else str(s.default)
    return f" Default: {value}."


def options_section() -> str:
    out = []
    for s in SETTINGS:
        flags = ", ".join(f"\\fB{_roff(f)}\\fR" + (f" \\fI{_roff(s.metavar)}\\fR"
                                                     if s.metavar else "") for f in s.flags)
        out += [".TP", flags, _roff(s.help[0].upper() + s.help[1:]) + "." + _default(s)]
    return "\n".join(out)


def _toml_type(s: Setting) -> str:
    if s.count:
        return "integer"
    if s.convert is None:
        return "boolean"
    if s.repeat:
        return "array of strings"
    if isinstance(s.default, float):
        return "number"
    return "string or integer" if s.metavar in ("N", "MAX", "USEC", "BYTES", "SECONDS",
                                                "MIB", "0|1") else "string"


def settings_section() -> str:
    out = [".TP", "\\fBroot\\fR = \\fIstring\\fR",
           "The directory served, as the \\fIROOT\\fR argument of \\fBtftpd\\fR(8)."]
    for s in SETTINGS:
        out += [".TP", f"\\fB{_roff(s.key)}\\fR = \\fI{_toml_type(s)}\\fR",
                _roff(s.help[0].upper() + s.help[1:]) + f" (\\fB{_roff(s.flags[-1])}\\fR)."
                + _default(s)]
    return "\n".join(out)


def environment_section() -> str:
    out = []
    for var in ENVIRONMENT:
        value, _, what = var.help.partition(": ")
        out += [".TP", f".B {var.name}", f"\\fB{_roff(value)}\\fR: {_roff(what)}."]
    return "\n".join(out)


def render(text: str, name: str, body: str) -> str:
    pattern = re.compile(re.escape(BEGIN.format(name)) + r"\n(?:.*?\n)?"
                         + re.escape(END.format(name)), re.S)
    if not pattern.search(text):
        raise ValueError(f"no generated {name} markers")
    return pattern.sub(lambda _: f"{BEGIN.format(name)}\n{body}\n{END.format(name)}", text)


def pages() -> dict[Path, str]:
    """Each man page as it should be, generated parts filled in."""
    page8, page5 = MAN / "tftpd.8", MAN / "tftpd.conf.5"
    text8 = render(page8.read_text(), "OPTIONS", options_section())
    return {page8: render(text8, "ENVIRONMENT", environment_section()),
            page5: render(page5.read_text(), "SETTINGS", settings_section())}


def main() -> int:
    for path, text in pages().items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"updated {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
