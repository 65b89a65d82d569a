"""The compiled C data path (tftpd._datapath): what this Python expects of it.

Only tftpd.datapath imports the compiled module; this module holds the numbers
both sides must agree on and checks a loaded module against them.
"""

from __future__ import annotations

import os
from typing import Any

from tftpd import transfer as T
from tftpd.datapath import events as E
from tftpd.datapath.net import DRAIN_MAX

__all__ = ["BATCH", "EXT_VERSION", "REQ_BATCH", "REQ_MAX", "load"]

# The version of _ext/tftpd_datapath.h this package speaks; the compiled module
# reports its own (TFTPD_DATAPATH_VERSION) and a mismatch means a stale build.
EXT_VERSION = 12

# Blocks read and sent per batch; equal to TFTPD_MAX_BATCH in the C code
# (checked at load) so both implementations stop at the same place.
BATCH = 64

REQ_MAX = 65536  # TFTPD_REQ_MAX: one UDP payload
REQ_BATCH = 32  # TFTPD_REQ_BATCH

_SAME = {  # name in C: the Python value
    "TFTPD_MAX_BATCH": BATCH,
    "TFTPD_REQ_MAX": REQ_MAX,
    "TFTPD_REQ_BATCH": REQ_BATCH,
    "TFTPD_DRAIN_MAX": DRAIN_MAX,
    "TFTPD_UNANSWERED_RETRIES": T.UNANSWERED_RETRIES,
    "TFTPD_RTO_FLOOR_MS": round(T.RTO_FLOOR * 1000),
    "TFTPD_RTO_CEILING_MS": round(T.RTO_CEILING * 1000),
    "TFTPD_EV_PACKET": E.EV_PACKET,
    "TFTPD_EV_DONE": E.EV_DONE,
    "TFTPD_EV_ERROR": E.EV_ERROR,
    "TFTPD_EV_READY": E.EV_READY,
    "TFTPD_EV_PROBE": E.EV_PROBE,
    "TFTPD_EV_REARM": E.EV_REARM,
    "TFTPD_EV_SHRANK": E.EV_SHRANK,
    "TFTPD_REQ_ANSWERED": E.REQ_ANSWERED,
    "TFTPD_REQ_PASS": E.REQ_PASS,
    "TFTPD_REQ_STARTED": E.REQ_STARTED,
    "TFTPD_REQ_MERGED": E.REQ_MERGED,
    "TFTPD_OWNER_PYTHON": E.Owner.PYTHON,
    "TFTPD_OWNER_C": E.Owner.C,
    "TFTPD_OWNER_ENDED": E.Owner.ENDED,
}


def load() -> tuple[Any, str | None]:
    """The compiled module and None, or None and why it cannot be used."""
    try:
        from tftpd import _datapath  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the C data path tftpd._datapath is not built ({exc})"
    version = _datapath.lib.TFTPD_DATAPATH_VERSION
    if version != EXT_VERSION:
        return None, (
            f"the C data path tftpd._datapath is version {version}, this tftpd "
            f"expects {EXT_VERSION}: rebuild it (pip install -e . or "
            "python3 setup.py build_ext --inplace)"
        )
    for name, value in _SAME.items():
        if getattr(_datapath.lib, name, None) != value:
            return None, f"the C data path has {name} otherwise than this tftpd: rebuild it"
    # The tables' hash key: random, so that no client can aim at one chain.
    _datapath.lib.tftpd_hash_key(int.from_bytes(os.urandom(8), "little"),
                                 int.from_bytes(os.urandom(8), "little"))
    return _datapath, None
