"""Compile the bench-only send variants (variants.c) through cffi at first use.

The module lands in bench/.build/variants/ (gitignored), rebuilt when missing or older
than variants.c / variants.h; never in tftpd/.  ``load()`` returns the module (its
``ffi`` and ``lib``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import ModuleType

from bench.build import BUILD_DIR, build_cffi, load_cffi

HERE = Path(__file__).resolve().parent
HEADER = HERE / "variants.h"
SOURCE = HERE / "variants.c"
MODNAME = "_tftpbench_variants"
OUT_DIR = BUILD_DIR / "variants"

# "#define VB_NAME 123": integer constants whose values cffi takes from the compiler.
_CONSTANT = re.compile(r"#\s*define\s+(VB_\w+)\s+(?:\d+|0x[0-9a-fA-F]+)\s*$")

_mod: ModuleType | None = None


def cdef_from_header(text: str) -> str:
    """The header minus preprocessor lines; integer #defines become ``#define NAME ...``."""
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            match = _CONSTANT.match(stripped)
            if match:
                out.append(f"#define {match.group(1)} ...")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def build(force: bool = False) -> Path:
    """Compile the module if needed; return the path of the .so."""
    return build_cffi(MODNAME, cdef_from_header(HEADER.read_text(encoding="utf-8")),
                      '#include "variants.h"\n', [SOURCE], [HEADER, SOURCE, Path(__file__)],
                      OUT_DIR, "bench/variants/variants.c",
                      extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"], force=force)


def load() -> ModuleType:
    """The compiled module, built first if needed."""
    global _mod
    if _mod is None:
        _mod = load_cffi(MODNAME, build())
    return _mod


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
