"""The content hook of the `tftpd-hook` bench server: every request is served as usual.

What a hook costs a storm when it decides nothing: each request's round trip through the
worker's hook threads, and C's known answers off (a hook makes answers per client).
"""

from __future__ import annotations

from typing import Any


def content(request: Any) -> None:
    return None
