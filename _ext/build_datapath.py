"""cffi builder for tftpd._datapath (out-of-line API mode).

The API lives in one header, tftpd_datapath.h, whose declarations cffi's
cdef() reads (the bcrypt / pynacl layout); the implementation is the files in
SOURCES (sharing tftpd_internal.h), compiled next to cffi's generated wrapper.

Used by setup.py through ``cffi_modules=["_ext/build_datapath.py:ffibuilder"]``;
``python3 _ext/build_datapath.py`` builds the module in place
(tftpd/_datapath*.so) without setuptools' help.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADER = os.path.join(HERE, "tftpd_datapath.h")
INTERNAL = os.path.join(HERE, "tftpd_internal.h")
# One file per concept: sending, the ACK rules, the pump, the peer table, the
# known-answer table, request intake.  tests/c/short_reads.c and tests/asan.sh
# compile the same list (SOURCES, read from here).
SOURCES = [os.path.join(HERE, f"tftpd_{name}.c")
           for name in ("send", "ack", "pump", "peers", "known", "requests")]

# "#define TFTPD_NAME 123" (a comment may follow): integer constants Python reads.
_CONSTANT = re.compile(r"#\s*define\s+(TFTPD_\w+)\s+(?:\d+|0x[0-9a-fA-F]+)\s*(?:/\*.*\*/)?\s*$")


def cdef_from_header(text: str) -> str:
    """The header's declarations, in the subset of C that cdef() parses.

    Preprocessor lines go; integer #defines come back as ``#define NAME ...``
    so that cffi takes their values from the compiler, not from this text.
    """
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


def _path(path: str) -> str:
    # setuptools wants source paths relative to the project root, which is
    # the working directory of pip and setup.py builds; ffibuilder.compile()
    # below changes directory, so run as a script we use absolute paths.
    if __name__ == "__main__":
        return path
    return os.path.relpath(path, os.getcwd())


with open(HEADER, encoding="utf-8") as f:
    _header_text = f.read()


def sanitizer_flags(env: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Compile and link flags for a sanitized build: TFTPD_SANITIZE=address,undefined
    (any -fsanitize= list) builds with the sanitizers, not recovering from any report.
    Used by tests/asan.sh; empty otherwise."""
    which = (os.environ if env is None else env).get("TFTPD_SANITIZE", "").strip()
    if not which:
        return [], []
    flags = [f"-fsanitize={which}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             "-g", "-O1"]
    return flags, [f"-fsanitize={which}"]


_compile_args, _link_args = sanitizer_flags()
ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(_header_text))
ffibuilder.set_source(
    "tftpd._datapath",
    '#include "tftpd_datapath.h"\n',
    sources=[_path(s) for s in SOURCES],
    include_dirs=[_path(HERE)],
    depends=[_path(HEADER), _path(INTERNAL)],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    import shutil

    # Generated C and objects stay under build/; only the module lands in tftpd/.
    built = ffibuilder.compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
    target = os.path.join(ROOT, "tftpd", os.path.basename(built))
    shutil.copy(built, target)
    print("built", target)
