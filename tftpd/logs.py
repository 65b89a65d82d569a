"""Log handling shared by the master and the workers.

A worker finishes thousands of probes a second, each with its one log line; writing
them one write(2) at a time would cost as much as answering them. Workers switch
their handler to batching and flush once per loop turn.
"""

from __future__ import annotations

import logging

log = logging.getLogger("tftpd")


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, once a worker asks for it, writes its lines once per
    loop turn instead of once per record: one write(2) for a burst of finished probes.
    Each line is written whole, so lines of different workers never interleave."""

    batching = False

    def __init__(self, stream: object) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self.pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not self.batching:
            super().emit(record)
            return
        try:
            self.pending.append(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never take the server down
            self.handleError(record)
        if len(self.pending) >= 256:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            data, self.pending = "".join(self.pending), []
            try:
                self.stream.write(data)
            except OSError:
                pass
        super().flush()


def flush_logs() -> None:
    for h in log.handlers:
        h.flush()


def start_batching() -> None:
    for h in log.handlers:
        if isinstance(h, BatchingHandler):
            h.batching = True


