"""tftpd-fuzz: a conformance fuzzer for any TFTP server (hypothesis needed: `pip install
'tftpd[fuzz]'`). The strategies are public: `from tftpd.fuzz import scenarios`."""

from __future__ import annotations

try:
    from tftpd.fuzz.strategies import (
        corpus,
        junk_datagrams,
        modes,
        option_lists,
        option_names,
        option_values,
        reactions,
        requests,
        scenarios,
    )
except ModuleNotFoundError as exc:  # the command says so clearly; see cli.main
    if exc.name != "hypothesis":
        raise
    HYPOTHESIS_MISSING: str | None = str(exc)
else:
    HYPOTHESIS_MISSING = None

__all__ = ["corpus", "junk_datagrams", "modes", "option_lists", "option_names", "option_values",
           "reactions", "requests", "scenarios", "HYPOTHESIS_MISSING"]
