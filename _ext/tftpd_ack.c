/*
 * tftpd_ack.c - the lock-step rules of a read transfer that C applies to an
 * ACK: which absolute block a wire number acknowledges, the RTT sample and the
 * RTO, the next window, and the ACK itself.  Each names its Python twin in
 * tftpd/transfer.py; tests/test_twins.py holds the two equal.
 */

#define _GNU_SOURCE /* sendmmsg(), recvmmsg(), struct in6_pktinfo */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <string.h>

#include "tftpd_internal.h"

/* The absolute block acknowledged by wire number n, or 0 if none in flight.
 * Python twin: tftpd.transfer.ReadTransfer._absolute. */
unsigned long long tftpd_absolute(const struct tftpd_xfer *x, unsigned int n)
{
    unsigned long long base = x->last_acked;
    unsigned int cycles[2] = {65536, 65535};
    int i, ncycles = x->rollover ? 2 : 1;

    for (i = 0; i < ncycles; i++) {
        unsigned int c = cycles[i];
        unsigned int wb = tftpd_wire_block(base, x->rollover);
        /* Python's (n - wb) % c, always non-negative. */
        unsigned long long d = ((unsigned long long)n + c - wb % c) % c;
        unsigned long long k = base + d;
        if (k <= x->sent_upto && tftpd_wire_block(k, x->rollover) == n)
            return k;
    }
    return 0;
}

/* An RTT sample from the window just acknowledged, and the RTO from it
 * (RFC 6298).  Python twin: tftpd.transfer.ReadTransfer._sample_rtt. */
void tftpd_sample_rtt(struct tftpd_xfer *x, double now)
{
    double r, rto;

    if (x->fixed_rto || x->resent)
        return;
    r = now - x->sent_at;
    if (r < 0)
        r = 0;
    if (x->srtt < 0) {
        x->srtt = r;
        x->rttvar = r / 2;
    } else {
        double dev = x->srtt - r;
        if (dev < 0)
            dev = -dev;
        x->rttvar = 0.75 * x->rttvar + 0.25 * dev;
        x->srtt = 0.875 * x->srtt + 0.125 * r;
    }
    rto = x->srtt + 4 * x->rttvar;
    if (rto < TFTPD_RTO_FLOOR_MS / 1000.0)
        rto = TFTPD_RTO_FLOOR_MS / 1000.0;
    if (rto > TFTPD_RTO_CEILING_MS / 1000.0)
        rto = TFTPD_RTO_CEILING_MS / 1000.0;
    x->base_rto = rto;
    x->rto = rto;
}

/* Send the window that starts at block `first`; 0, or -errno / -ESHRANK.
 * Back-pressure is not an error: the retransmission timer covers it.
 * Python twin: tftpd.transfer.ReadTransfer._send_window. */
int tftpd_next_window(struct tftpd_xfer *x, unsigned long long first, double now,
                      char *scratch, size_t scratch_len, unsigned int *gso)
{
    unsigned long long count = x->nblocks - first + 1;
    int rc;

    if (count > x->windowsize)
        count = x->windowsize;
    unsigned int seg = gso != NULL && *gso && x->gso;

    x->sent_upto = first + count - 1;
    x->sent_at = now;
    x->armed_at = now;
    x->resent = 0;
    rc = tftpd_send_blocks(x->sock, x->addr, x->addrlen, x->fd, x->mem, x->filesize,
                           x->blksize,
                           first, (unsigned int)count, x->rollover, scratch, scratch_len, &seg);
    if (gso != NULL && *gso && x->gso && !seg)
        x->gso = 0; /* its route refused: plain datagrams for this transfer alone */
    return rc < 0 ? rc : 0;
}

/* Handle an ACK from the peer of a fast transfer: 1 when it finished it,
 * 2 when it sent the next window, 4 when it did and the timer is now due
 * sooner than it was (Python's timer heap must hear of it), 0 when it ignored
 * the ACK, 3 when Python must judge it, -errno / -ESHRANK when the next send
 * failed.  Python twin: tftpd.transfer.ReadTransfer._on_ack. */
int tftpd_on_ack(struct tftpd_xfer *x, unsigned int n, double now,
                 char *scratch, size_t scratch_len, unsigned int *gso)
{
    unsigned long long k = tftpd_absolute(x, n);
    double due = x->armed_at + x->rto;
    int complete, rc;

    if (k == 0 || k == x->last_acked)
        /* Duplicate or stale: never resend on it (Sorcerer's Apprentice).  While
         * the timer backs off, a repeated ACK ends the backoff: Python's rule
         * (ReadTransfer._revive), and a timer that comes sooner, which only
         * Python can re-arm. */
        return x->retries > 0 ? 3 : 0;
    complete = k == x->sent_upto;
    if (complete)
        tftpd_sample_rtt(x, now);
    x->last_acked = k;
    x->retries = 0;
    x->rto = x->base_rto;
    if (k == x->nblocks) {
        x->fast = 0;
        return 1;
    }
    if (!complete)
        x->retransmits += x->sent_upto - k; /* RFC 7440: restart after k */
    rc = tftpd_next_window(x, k + 1, now, scratch, scratch_len, gso);
    if (rc < 0)
        return rc;
    /* Progress after a backoff (or a much smaller RTT) brings the timer forward;
     * Python's heap may hold it up to TFTPD_REARM_SLACK late. */
    return x->armed_at + x->rto < due - TFTPD_REARM_SLACK ? 4 : 2;
}

/* ERROR 0, 8 or 9 in answer to an OACK: an existence probe's end (the client
 * read tsize and stops).  Python twin: tftpd.transfer.is_probe_end. */
int tftpd_is_probe_end(const unsigned char *p, size_t len)
{
    return len >= 4 && p[0] == 0 && p[1] == TFTPD_OPCODE_ERROR && p[2] == 0
        && (p[3] == 0 || p[3] == 8 || p[3] == 9);
}
