"""Build glue: cffi compiles the C data path (_ext/) into tftpd._datapath.

Everything declarative lives in pyproject.toml; this file only adds the cffi
extension and decides what a failed C build means:

- by default the failure is reported as a warning and the install goes on;
  tftpd.datapath then serves with its pure-Python twin (and warns at run time);
- with TFTPD_REQUIRE_EXT=1 (CI sets it) the failure fails the install, because
  an optional extension can otherwise hide a broken C build.

Builds: ``pip install .``, ``pip install -e .`` (the editable build leaves
tftpd/_datapath*.so in the source tree) or ``python3 setup.py build_ext --inplace``.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _ext_required() -> bool:
    return os.environ.get("TFTPD_REQUIRE_EXT", "").strip().lower() not in ("", "0", "no", "false")


class OptionalBuildExt(build_ext):
    """build_ext that lets the C data path fail unless it is required.

    cffi wraps whatever class sits in cmdclass["build_ext"] with its own
    subclass that first generates the C wrapper, so the errors caught here
    include both generating and compiling it.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means "no extension"
            self._give_up(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc, ext)

    def copy_extensions_to_source(self) -> None:
        # Only what was built can be copied back for an in-place build.
        self.extensions = [e for e in self.extensions if os.path.exists(self._built_path(e))]
        super().copy_extensions_to_source()

    def _built_path(self, ext) -> str:  # type: ignore[no-untyped-def]
        return os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))

    def _give_up(self, exc: BaseException, ext=None) -> None:  # type: ignore[no-untyped-def]
        if _ext_required():
            raise exc
        name = ext.name if ext is not None else "tftpd._datapath"
        message = (
            f"WARNING: building the C extension {name} failed ({exc!r}); "
            "tftpd will use its pure-Python data path. "
            "Set TFTPD_REQUIRE_EXT=1 to make this an error."
        )
        # pip shows this with -v only; tftpd.datapath warns again at run time.
        print(message, file=sys.stderr)


setup(
    cffi_modules=["_ext/build_datapath.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    # Man pages land in <prefix>/share/man, where man(1) finds them for a venv or
    # a system install alike.
    data_files=[("share/man/man8", ["man/tftpd.8"]), ("share/man/man5", ["man/tftpd.conf.5"]),
                ("share/man/man1", ["man/tftpd-fuzz.1", "man/tftpd-storm.1"]),
                ("share/tftpd/systemd", ["systemd/tftpd.service", "systemd/tftpd.socket"])],
)
