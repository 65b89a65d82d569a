"""Log handling shared by the master and the workers.

A worker finishes thousands of probes a second, each with its one log line; writing
them one write(2) at a time would cost as much as answering them. Workers switch
their handler to batching and flush once per loop turn.
"""

from __future__ import annotations

import logging

log = logging.getLogger("tftpd")
ATOMIC_WRITE = 4000  # characters; a pipe write below PIPE_BUF (4096) is atomic


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, once a worker asks for it, writes its lines once per
    loop turn instead of once per record: a few write(2)s for a burst of finished
    probes. Each write holds whole lines and stays under PIPE_BUF, so that on a pipe
    (journald, a supervisor) as in an O_APPEND file the lines of different workers
    never interleave mid-line."""

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
        pending, self.pending = self.pending, []
        chunk: list[str] = []
        size = 0
        try:
            for line in pending:
                if chunk and size + len(line) > ATOMIC_WRITE:
                    self._write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write("".join(chunk))
        except OSError:
            pass
        super().flush()

    def _write(self, data: str) -> None:
        self.stream.write(data)
        self.stream.flush()  # one write(2) per chunk, never a split line


def flush_logs() -> None:
    for h in log.handlers:
        h.flush()


def start_batching() -> None:
    for h in log.handlers:
        if isinstance(h, BatchingHandler):
            h.batching = True


