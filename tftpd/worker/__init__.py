"""A worker process: an event loop over the listen sockets it was handed and its
transfers. The only place in tftpd that waits.

    core      Worker: drives the transfers (applies what tftpd.transfer asks, ends
              them, takes over those C started), over the parts below
    intake    Listener, Forward, Intake: listen sockets, forwarding between workers
    requests  RequestPath: decide -> resolve the content -> negotiate -> start
    loops     Loop, SelectorLoop, PumpLoop: the event loop, chosen once at start;
              loop.watch(fd, on_readable) / loop.unwatch(fd) for any descriptor
    sessions  Session, SessionTable: live transfers, adoption of those C started
    timers    Timers: the deadline heap, and when C's OACK timers are due
    sockets   SocketPool: transfer sockets, C's spares, error sockets, --port-range
    records   TransferLog: counters and the record of each request and transfer
    process   signals and the wakeup pipe, the parent's death, interface MTUs

What to do with a request is decided without I/O in tftpd.decision.
"""

from tftpd.worker.core import Worker
from tftpd.worker.intake import Forward, Listener, enable_pktinfo, wants_pktinfo
from tftpd.worker.loops import IDLE_WAIT
from tftpd.worker.process import (
    MASTER_SIGNALS,
    MtuCache,
    WakeupPipe,
    blksize_for_mtu,
    open_sysfs,
)
from tftpd.worker.sessions import Session

EXIT_BOOT_FAILED = 3  # the master does not respawn a worker that exits with this

__all__ = ["EXIT_BOOT_FAILED", "IDLE_WAIT", "MASTER_SIGNALS", "Forward", "Listener",
           "MtuCache", "Session", "WakeupPipe", "Worker", "blksize_for_mtu", "enable_pktinfo",
           "open_sysfs", "wants_pktinfo"]
