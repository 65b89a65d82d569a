/*
 * tftpd_datapath.c - send a window of TFTP DATA blocks from a file to a
 * client: pread() into a caller-provided buffer, then sendmmsg() one datagram
 * per block, header and payload gathered from two iovecs.
 *
 * Why neither sendfile() nor mmap(): transfer sockets are unconnected (so the
 * server can answer a stray TID with ERROR 5), and sendfile() needs a
 * connected socket; a file truncated under a mapping raises SIGBUS, which
 * would kill a worker and every transfer it serves.  pread() merely comes up
 * short, which we report as TFTPD_ESHRANK.
 */
#define _GNU_SOURCE /* sendmmsg() */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tftpd_datapath.h"

#define TFTPD_OPCODE_DATA 3
#define TFTPD_MIN_BLKSIZE 8     /* RFC 2348 */
#define TFTPD_MAX_BLKSIZE 65464 /* RFC 2348 */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h, Linux >= 4.18 */
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
/* A segmented send is one UDP datagram to the stack: at most 64 KiB in all. */
#define TFTPD_GSO_MAX_BYTES 65000

unsigned int tftpd_wire_block(unsigned long long k, unsigned int rollover)
{
    if (k < 65536)
        return (unsigned int)k;
    /* After 65535 the counter restarts at `rollover`, and so on every lap. */
    return rollover + (unsigned int)((k - 65536) % (65536 - rollover));
}

/* Read exactly len bytes at off.  A regular file only comes up short at its
 * end, so a zero-byte read before len means the file shrank. */
static int tftpd_read_full(int fd, char *buf, size_t len, unsigned long long off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -TFTPD_ESHRANK;
        done += (size_t)n;
    }
    return 0;
}

/* Send n >= 2 consecutive blocks starting at k0 (file offset off) as ONE
 * sendmsg() with UDP_SEGMENT: the kernel cuts the buffer into datagrams of
 * 4 + blksize bytes (the last may be shorter), so one syscall and one trip
 * through the stack carry the whole batch.  The scratch buffer holds
 * header + payload for each block, back to back.  Returns n, 0 on
 * back-pressure, -errno, -ESHRANK, or -TFTPD_ENOGSO when the kernel or the
 * route refuses segmentation (the caller then stops asking). */
static int tftpd_send_gso(int sock, const char *addr, unsigned int addrlen, int fd,
                          const char *mem, unsigned long long filesize, unsigned int blksize,
                          unsigned long long k0, unsigned int n, unsigned int rollover,
                          char *scratch)
{
    struct iovec rd[TFTPD_MAX_BATCH];
    struct iovec iov;
    struct msghdr msg;
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } ctl;
    struct cmsghdr *cm;
    unsigned long long off = (k0 - 1) * blksize, end, want;
    size_t seg = (size_t)blksize + 4, total = 0, got = 0;
    uint16_t gso_size = (uint16_t)seg;
    unsigned int i, cur = 0;

    end = off + (unsigned long long)n * blksize;
    if (end > filesize)
        end = filesize;
    want = end - off;
    for (i = 0; i < n; i++) {
        unsigned long long boff = off + (unsigned long long)i * blksize;
        unsigned long long left = filesize - boff;
        size_t len = left < blksize ? (size_t)left : blksize;
        unsigned int wire = tftpd_wire_block(k0 + i, rollover);
        unsigned char *h = (unsigned char *)scratch + i * seg;

        h[0] = 0;
        h[1] = TFTPD_OPCODE_DATA;
        h[2] = (unsigned char)(wire >> 8);
        h[3] = (unsigned char)(wire & 0xff);
        rd[i].iov_base = h + 4;
        rd[i].iov_len = len;
        total = i * seg + 4 + len;
    }
    if (mem != NULL) { /* the file's image: copied, not read */
        for (i = 0; i < n; i++)
            memcpy(rd[i].iov_base, mem + off + (size_t)i * blksize, rd[i].iov_len);
        got = want;
    }
    /* One preadv() for the batch.  A read may come up short (a network file
     * system, a signal): the next one resumes in the iovec where it stopped,
     * so `cur` and the trimmed iovec always describe bytes got .. want.  A
     * read of nothing before `want` means the file shrank. */
    while (got < want && cur < n) {
        ssize_t r = preadv(fd, rd + cur, (int)(n - cur), (off_t)(off + got));
        size_t left;

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -TFTPD_ESHRANK;
        got += (size_t)r;
        for (left = (size_t)r; cur < n && left >= rd[cur].iov_len; cur++)
            left -= rd[cur].iov_len;
        if (cur < n) {
            rd[cur].iov_base = (char *)rd[cur].iov_base + left;
            rd[cur].iov_len -= left;
        }
    }
    if (got < want)
        return -EIO; /* the kernel said it read more than was asked */

    iov.iov_base = scratch;
    iov.iov_len = total;
    memset(&msg, 0, sizeof(msg));
    msg.msg_name = (void *)(uintptr_t)addr;
    msg.msg_namelen = addrlen;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof(ctl.buf);
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(cm), &gso_size, sizeof(gso_size));
    for (;;) {
        ssize_t r = sendmsg(sock, &msg, 0);
        if (r >= 0)
            return (int)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
            return 0;
        if (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT || errno == EOPNOTSUPP
            || errno == EMSGSIZE)
            return -TFTPD_ENOGSO;
        return -errno;
    }
}

int tftpd_send_window(int sock, const char *addr, unsigned int addrlen,
                      int fd, const char *mem, unsigned long long filesize,
                      unsigned int blksize, unsigned long long first, unsigned int count,
                      unsigned int rollover,
                      char *scratch, size_t scratch_len, unsigned int *gso)
{
    struct mmsghdr msgs[TFTPD_MAX_BATCH];
    struct iovec iov[TFTPD_MAX_BATCH][2];
    unsigned char hdr[TFTPD_MAX_BATCH][4];
    unsigned long long nblocks;
    size_t batch;
    unsigned int sent = 0;

    if (sock < 0 || (fd < 0 && mem == NULL) || addr == NULL || addrlen == 0
        || addrlen > sizeof(struct sockaddr_storage) || scratch == NULL
        || blksize < TFTPD_MIN_BLKSIZE || blksize > TFTPD_MAX_BLKSIZE
        || rollover > 1 || first < 1 || count < 1 || count > INT_MAX
        || filesize > (unsigned long long)INT64_MAX - TFTPD_MAX_BLKSIZE)
        return -EINVAL;
    /* Blocks 1 .. filesize / blksize + 1 exist (the last may be empty). */
    nblocks = filesize / blksize + 1;
    if (first > nblocks || count - 1 > nblocks - first)
        return -EINVAL;

    batch = scratch_len / blksize;
    if (batch < 1)
        return -EINVAL;
    if (batch > TFTPD_MAX_BATCH)
        batch = TFTPD_MAX_BATCH;

    while (sent < count) {
        unsigned long long k0 = first + sent;
        unsigned long long off = (k0 - 1) * blksize;
        unsigned long long end;
        unsigned int n = count - sent, done = 0, i;
        int rc;

        if (gso != NULL && *gso) {
            /* As many blocks as one segmented send may carry. */
            unsigned int g = count - sent;
            size_t fit = scratch_len / ((size_t)blksize + 4);
            size_t room = TFTPD_GSO_MAX_BYTES / ((size_t)blksize + 4);

            if (g > TFTPD_MAX_BATCH)
                g = TFTPD_MAX_BATCH;
            if (g > fit)
                g = (unsigned int)fit;
            if (g > room)
                g = (unsigned int)room;
            if (g >= 2) {
                rc = tftpd_send_gso(sock, addr, addrlen, fd, mem, filesize, blksize, k0, g,
                                    rollover, scratch);
                if (rc > 0) {
                    sent += (unsigned int)rc;
                    continue;
                }
                if (rc == 0)
                    return (int)sent; /* back-pressure */
                if (rc != -TFTPD_ENOGSO)
                    return rc;
                *gso = 0; /* not on this path: plain datagrams from now on */
            }
        }
        if (n > batch)
            n = (unsigned int)batch;
        end = off + (unsigned long long)n * blksize;
        if (end > filesize)
            end = filesize;
        /* off <= filesize because every block asked for exists.  From an
         * image the payloads are sent where they lie: no read, no copy. */
        if (mem == NULL) {
            rc = tftpd_read_full(fd, scratch, (size_t)(end - off), off);
            if (rc < 0)
                return rc;
        }

        for (i = 0; i < n; i++) {
            unsigned long long boff = off + (unsigned long long)i * blksize;
            unsigned long long left = filesize - boff;
            unsigned int wire = tftpd_wire_block(k0 + i, rollover);

            hdr[i][0] = 0;
            hdr[i][1] = TFTPD_OPCODE_DATA;
            hdr[i][2] = (unsigned char)(wire >> 8);
            hdr[i][3] = (unsigned char)(wire & 0xff);
            iov[i][0].iov_base = hdr[i];
            iov[i][0].iov_len = 4;
            iov[i][1].iov_base = mem != NULL ? (void *)(uintptr_t)(mem + boff)
                                             : scratch + (size_t)i * blksize;
            iov[i][1].iov_len = left < blksize ? (size_t)left : blksize;
            memset(&msgs[i], 0, sizeof(msgs[i]));
            /* sendmsg() never writes through msg_name; the cast drops const. */
            msgs[i].msg_hdr.msg_name = (void *)(uintptr_t)addr;
            msgs[i].msg_hdr.msg_namelen = addrlen;
            msgs[i].msg_hdr.msg_iov = iov[i];
            msgs[i].msg_hdr.msg_iovlen = 2;
        }

        /* sendmmsg() may stop early: it returns how many went out and
         * reports the error that stopped it on the next call. */
        while (done < n) {
            int r = sendmmsg(sock, msgs + done, n - done, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
                    return (int)(sent + done);
                return -errno;
            }
            if (r == 0) /* not documented to happen; never spin on it */
                return (int)(sent + done);
            done += (unsigned int)r;
        }
        sent += n;
    }
    return (int)sent;
}

/* ---- the lock-step pump ------------------------------------------------- */

#include <sys/epoll.h>
#include <time.h>

#define TFTPD_OPCODE_ACK 4
#define TFTPD_PUMP_READY_MAX 256 /* epoll events per call (stack array) */
#define TFTPD_PUMP_PER_SOCKET 16 /* datagrams read from one socket per call */
#define TFTPD_PUMP_ROOM 1500     /* pktbuf room kept for one reported datagram */
#define TFTPD_REARM_SLACK 0.05   /* s a timer may fire late rather than cost a Python turn */

/* The absolute block acknowledged by wire number n, or 0 if none in flight
 * (ReadTransfer._absolute). */
static unsigned long long tftpd_absolute(const struct tftpd_xfer *x, unsigned int n)
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

static void tftpd_sample_rtt(struct tftpd_xfer *x, double now)
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
 * Back-pressure is not an error: the retransmission timer covers it. */
static int tftpd_next_window(struct tftpd_xfer *x, unsigned long long first, double now,
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
    rc = tftpd_send_window(x->sock, x->addr, x->addrlen, x->fd, x->mem, x->filesize,
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
 * failed. */
static int tftpd_on_ack(struct tftpd_xfer *x, unsigned int n, double now,
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

static int tftpd_same_peer(const struct tftpd_xfer *x, const struct sockaddr_storage *src,
                           socklen_t srclen)
{
    return srclen == x->addrlen && memcmp(src, x->addr, srclen) == 0;
}

static double tftpd_monotonic(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail for this clock */
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Milliseconds to wait until `deadline`, rounded up; 0 once it has passed. */
static int tftpd_wait_ms(double deadline)
{
    double left = deadline - tftpd_monotonic();

    if (left <= 0)
        return 0;
    if (left > 86400.0)
        left = 86400.0;
    return (int)(left * 1000.0) + 1;
}

/* -- the peer table: which slot serves a peer --------------------------------- */

#define TFTPD_OPCODE_ERROR 5

static unsigned int tftpd_peer_home(const struct tftpd_starts *st, const char *addr,
                                    unsigned int addrlen)
{
    return (unsigned int)tftpd_hash(addr, addrlen) & (st->peers_len - 1);
}

static int tftpd_peers_ok(const struct tftpd_starts *st)
{
    return st != NULL && st->peers != NULL && st->peers_len >= 2
        && (st->peers_len & (st->peers_len - 1)) == 0 && st->table != NULL;
}

int tftpd_peer_find(const struct tftpd_starts *st, const char *addr, unsigned int addrlen)
{
    unsigned int i, n, mask;

    if (!tftpd_peers_ok(st) || addr == NULL || addrlen == 0 || addrlen > 28)
        return -1;
    mask = st->peers_len - 1;
    for (n = 0, i = tftpd_peer_home(st, addr, addrlen); n < st->peers_len;
         n++, i = (i + 1) & mask) {
        unsigned int cell = st->peers[i];
        const struct tftpd_xfer *x;

        if (cell == 0)
            return -1;
        if (cell - 1 < st->table_len && (x = st->table[cell - 1]) != NULL
            && x->addrlen == addrlen && memcmp(x->addr, addr, addrlen) == 0)
            return (int)(cell - 1);
    }
    return -1;
}

int tftpd_peer_put(struct tftpd_starts *st, unsigned int slot)
{
    const struct tftpd_xfer *x;
    unsigned int i, mask;

    if (!tftpd_peers_ok(st) || slot >= st->table_len || (x = st->table[slot]) == NULL
        || x->addrlen == 0 || x->addrlen > sizeof(x->addr))
        return -EINVAL;
    if (2 * (st->npeers + 1) > st->peers_len)
        return -ENOSPC;
    mask = st->peers_len - 1;
    for (i = tftpd_peer_home(st, x->addr, x->addrlen); st->peers[i] != 0; i = (i + 1) & mask)
        if (st->peers[i] == slot + 1)
            return 0; /* already there */
    st->peers[i] = slot + 1;
    st->npeers++;
    return 0;
}

void tftpd_peer_del(struct tftpd_starts *st, unsigned int slot)
{
    const struct tftpd_xfer *x;
    unsigned int i, j, mask;

    if (!tftpd_peers_ok(st) || slot >= st->table_len || (x = st->table[slot]) == NULL
        || x->addrlen == 0 || x->addrlen > sizeof(x->addr))
        return;
    mask = st->peers_len - 1;
    for (i = tftpd_peer_home(st, x->addr, x->addrlen); st->peers[i] != slot + 1;
         i = (i + 1) & mask)
        if (st->peers[i] == 0)
            return; /* not there */
    st->peers[i] = 0;
    st->npeers--;
    /* The rest of the cluster is entered again, so that no probe for one of them
     * stops at the hole (Knuth's deletion for linear probing; no tombstones).  A
     * cell whose transfer is gone cannot be placed and is dropped: that cannot
     * happen while Python keeps the rules, and leaves no hole if it does. */
    for (j = (i + 1) & mask; st->peers[j] != 0; j = (j + 1) & mask) {
        unsigned int cell = st->peers[j], k;
        const struct tftpd_xfer *y;

        st->peers[j] = 0;
        st->npeers--;
        if (cell - 1 >= st->table_len || (y = st->table[cell - 1]) == NULL
            || y->addrlen == 0 || y->addrlen > sizeof(y->addr))
            continue;
        for (k = tftpd_peer_home(st, y->addr, y->addrlen); st->peers[k] != 0;
             k = (k + 1) & mask)
            ;
        st->peers[k] = cell;
        st->npeers++;
    }
}

int tftpd_overdue(const struct tftpd_starts *st, double now, unsigned int *out,
                  unsigned int max, double *next)
{
    unsigned int slot, n = 0;

    if (st == NULL || st->table == NULL || out == NULL)
        return -EINVAL;
    for (slot = 0; slot < st->table_len && n < max; slot++) {
        const struct tftpd_xfer *x = st->table[slot];
        double due;

        if (x == NULL || x->probe != 1)
            continue;
        due = x->armed_at + x->rto;
        if (due <= now)
            out[n++] = slot;
        else if (next != NULL && due < *next)
            *next = due;
    }
    if (n == max && slot < st->table_len && next != NULL)
        *next = now; /* cut short: scan again at once for the rest */
    return (int)n;
}

/* A transfer C started heard ERROR 0, 8 or 9: its probe is over.  Returns
 * TFTPD_PROBE_OFFERED when its slot is offered again.  Its socket leaves the
 * epoll set and is Python's to close: a port that served one client never
 * serves the next (an attacker who learns it learns nothing). */
static unsigned int tftpd_end_probe(struct tftpd_starts *st, int epfd, unsigned int slot,
                                    struct tftpd_xfer *x)
{
    unsigned int back = 0;

    x->probe = 2;
    if (st == NULL)
        return 0;
    tftpd_peer_del(st, slot);
    if (st->live > 0)
        st->live--;
    /* Out of the set now, so that nothing it still receives is taken for the
     * slot's next transfer.  Should that fail, closing it takes it out. */
    (void)tftpd_epoll_set(epfd, TFTPD_EPOLL_DEL, x->sock, slot);
    if (st->free_slots != NULL && st->nfree < st->free_cap) {
        st->free_slots[st->nfree++] = slot;
        back |= TFTPD_PROBE_OFFERED;
    }
    return back;
}

int tftpd_pump(int epfd, struct tftpd_xfer **table, unsigned int table_len,
               double now, int timeout_ms, unsigned int max_ready,
               struct tftpd_event *events, unsigned int max_events,
               char *pktbuf, size_t pktbuf_len,
               char *scratch, size_t scratch_len, unsigned int *gso,
               struct tftpd_starts *st)
{
    struct epoll_event ready[TFTPD_PUMP_READY_MAX];
    unsigned int nev = 0, used = 0;
    double deadline = now + (timeout_ms > 0 ? timeout_ms / 1000.0 : 0.0);
    int wait = timeout_ms > 0 ? timeout_ms : 0;
    int nready, i;

    if (table == NULL || events == NULL || pktbuf == NULL || scratch == NULL
        || max_events == 0)
        return -EINVAL;
    if (max_ready > TFTPD_PUMP_READY_MAX)
        max_ready = TFTPD_PUMP_READY_MAX;
    if (max_ready == 0)
        return 0;

again:
    for (;;) {
        nready = epoll_wait(epfd, ready, (int)max_ready, wait);
        if (nready >= 0)
            break;
        if (errno != EINTR)
            return -errno;
        /* A signal: its handler's pipe is a token, reported on the next wait. */
        wait = wait > 0 ? tftpd_wait_ms(deadline) : 0;
    }
    if (nready == 0)
        return 0; /* the time is up, nothing happened */
    if (wait > 0)
        now = tftpd_monotonic(); /* the wait took time: RTT samples need the truth */

    for (i = 0; i < nready; i++) {
        unsigned int slot = (unsigned int)(ready[i].data.u64 & 0xffffffffu);
        int fd = (int)(ready[i].data.u64 >> 32);
        struct tftpd_xfer *x;
        int d;

        if (slot >= TFTPD_TOKEN_BASE) {
            if (nev >= max_events)
                return (int)nev; /* level-triggered: it is reported next time */
            memset(&events[nev], 0, sizeof(events[nev]));
            events[nev].slot = slot;
            events[nev].kind = TFTPD_EV_READY;
            nev++;
            continue;
        }
        if (slot >= table_len || (x = table[slot]) == NULL || x->sock != fd) {
            /* A socket still in the set whose slot no longer serves it: out of
             * the set, or level-triggered epoll reports it again at once and
             * the pump spins.  (A closed socket leaves the set by itself.) */
            (void)tftpd_epoll_set(epfd, TFTPD_EPOLL_DEL, fd, slot);
            continue;
        }
        for (d = 0; d < TFTPD_PUMP_PER_SOCKET; d++) {
            struct sockaddr_storage src;
            socklen_t srclen = sizeof(src);
            unsigned char *p;
            ssize_t len;
            int rc;

            /* Never read a datagram there is no room to report. */
            if (nev >= max_events || pktbuf_len - used < TFTPD_PUMP_ROOM)
                return (int)nev;
            p = (unsigned char *)pktbuf + used;
            len = recvfrom(x->sock, p, TFTPD_PUMP_ROOM, MSG_DONTWAIT,
                           (struct sockaddr *)&src, &srclen);
            if (len < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                /* ICMP port unreachable and friends: Python decides. */
                events[nev].slot = slot;
                events[nev].kind = TFTPD_EV_ERROR;
                events[nev].err = errno;
                events[nev].off = events[nev].len = events[nev].srclen = 0;
                nev++;
                x->fast = 0;
                break;
            }
            if (x->probe == 1 && len >= 4 && p[0] == 0 && p[1] == TFTPD_OPCODE_ERROR
                && p[2] == 0 && (p[3] == 0 || p[3] == 8 || p[3] == 9)
                && tftpd_same_peer(x, &src, srclen)) {
                /* An existence probe: the client read tsize and stops. */
                memset(&events[nev], 0, sizeof(events[nev]));
                events[nev].slot = slot;
                events[nev].kind = TFTPD_EV_PROBE;
                events[nev].err = p[3];
                events[nev].off = tftpd_end_probe(st, epfd, slot, x);
                events[nev].srclen = srclen;
                memcpy(events[nev].src, &src, srclen);
                nev++;
                break;
            }
            if (x->fast && len >= 4 && p[0] == 0 && p[1] == TFTPD_OPCODE_ACK
                && tftpd_same_peer(x, &src, srclen)) {
                rc = tftpd_on_ack(x, ((unsigned int)p[2] << 8) | p[3], now,
                                  scratch, scratch_len, gso);
                if (rc == 0)
                    continue; /* a stale ACK: read on */
                if (rc == 3)
                    goto python; /* a repeated ACK while backing off */
                if (rc == 2)
                    break; /* the next ACK needs a round trip: no recv to EAGAIN */
                if (rc == 4) {
                    memset(&events[nev], 0, sizeof(events[nev]));
                    events[nev].slot = slot;
                    events[nev].kind = TFTPD_EV_REARM;
                    nev++;
                    break;
                }
                events[nev].slot = slot;
                events[nev].kind = rc == 1 ? TFTPD_EV_DONE : TFTPD_EV_ERROR;
                events[nev].err = rc == 1 ? 0 : -rc;
                events[nev].off = events[nev].len = events[nev].srclen = 0;
                nev++;
                x->fast = 0;
                break; /* the transfer is over: what follows is Python's */
            }
python:
            events[nev].slot = slot;
            events[nev].kind = TFTPD_EV_PACKET;
            events[nev].err = 0;
            events[nev].off = used;
            events[nev].len = (unsigned int)len;
            events[nev].srclen = srclen <= sizeof(events[nev].src) ? srclen : 0;
            memcpy(events[nev].src, &src, events[nev].srclen);
            nev++;
            used += (unsigned int)len;
            break; /* Python may change this transfer: let it look first */
        }
    }
    if (nev > 0 || timeout_ms <= 0)
        return (int)nev;
    /* Every ready socket was an ACK C answered: wait on, for what is left. */
    wait = tftpd_wait_ms(deadline);
    if (wait == 0)
        return 0;
    goto again;
}

int tftpd_epoll_set(int epfd, int op, int fd, unsigned int slot)
{
    struct epoll_event ev;

    if (op != EPOLL_CTL_ADD && op != EPOLL_CTL_DEL)
        return -EINVAL;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u64 = ((uint64_t)(uint32_t)fd << 32) | slot;
    if (epoll_ctl(epfd, op, fd, &ev) < 0)
        return -errno;
    return 0;
}

/* ---- requests with a known answer --------------------------------------- */

#include <sys/stat.h>
#include <time.h>

#ifndef SCM_TIMESTAMPNS
#define SCM_TIMESTAMPNS 35 /* SO_TIMESTAMPNS, asm-generic/socket.h */
#endif
/* Room for IPV6_PKTINFO (or IP_PKTINFO) and a struct timespec, aligned. */
#define TFTPD_REQ_CMSG 128

/* SipHash-2-4 (Aumasson and Bernstein), keyed by tftpd_hash_key. */
static uint64_t tftpd_key[2];

void tftpd_hash_key(unsigned long long k0, unsigned long long k1)
{
    tftpd_key[0] = k0;
    tftpd_key[1] = k1;
}

#define TFTPD_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define TFTPD_SIPROUND                                                                   \
    do {                                                                                  \
        v0 += v1; v1 = TFTPD_ROTL(v1, 13); v1 ^= v0; v0 = TFTPD_ROTL(v0, 32);           \
        v2 += v3; v3 = TFTPD_ROTL(v3, 16); v3 ^= v2;                                    \
        v0 += v3; v3 = TFTPD_ROTL(v3, 21); v3 ^= v0;                                    \
        v2 += v1; v1 = TFTPD_ROTL(v1, 17); v1 ^= v2; v2 = TFTPD_ROTL(v2, 32);           \
    } while (0)

unsigned long long tftpd_hash(const char *buf, unsigned int len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t v0 = 0x736f6d6570736575ULL ^ tftpd_key[0];
    uint64_t v1 = 0x646f72616e646f6dULL ^ tftpd_key[1];
    uint64_t v2 = 0x6c7967656e657261ULL ^ tftpd_key[0];
    uint64_t v3 = 0x7465646279746573ULL ^ tftpd_key[1];
    uint64_t b = (uint64_t)len << 56, m, h;
    unsigned int i, left = len & 7;

    for (i = 0; i + 8 <= len; i += 8) {
        int j;
        for (m = 0, j = 7; j >= 0; j--) /* little-endian, whatever the host */
            m = (m << 8) | p[i + (unsigned int)j];
        v3 ^= m;
        TFTPD_SIPROUND;
        TFTPD_SIPROUND;
        v0 ^= m;
    }
    while (left > 0) {
        left--;
        b |= (uint64_t)p[i + left] << (8 * left);
    }
    v3 ^= b;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    h = v0 ^ v1 ^ v2 ^ v3;
    return h ? h : 1;
}

static double tftpd_realtime(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_REALTIME, &ts) < 0)
        return 0.0;
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The directory (or file) still is as it was when the entry was made: the
 * fields of identity() in tftpd/files.py, its Python twin. */
static int tftpd_dir_holds(const struct tftpd_refusal *r)
{
    struct stat st;

    if (r->dir == NULL)
        return 0;
    if (stat(r->dir, &st) < 0)
        return !r->dir_known;
    return r->dir_known && (unsigned long long)st.st_dev == r->dev
        && (unsigned long long)st.st_ino == r->ino
        && (unsigned long long)st.st_size == r->size
        && (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec == r->mtime_ns
        && (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec == r->ctime_ns
        && (unsigned int)st.st_mode == r->mode && (unsigned int)st.st_uid == r->uid
        && (unsigned int)st.st_gid == r->gid;
}

static const struct tftpd_refusal *tftpd_lookup(const struct tftpd_refusal *table,
                                                unsigned int table_len, const char *req,
                                                unsigned int len, double now)
{
    unsigned long long h;
    unsigned int i, n;

    if (table == NULL || table_len == 0 || (table_len & (table_len - 1)) != 0)
        return NULL;
    h = tftpd_hash(req, len);
    for (n = 0, i = (unsigned int)h & (table_len - 1); n < table_len;
         n++, i = (i + 1) & (table_len - 1)) {
        const struct tftpd_refusal *r = &table[i];
        if (r->hash == 0)
            return NULL;
        if (r->hash == h && r->reqlen == len && memcmp(r->req, req, len) == 0)
            return r->expires > now && tftpd_dir_holds(r) ? r : NULL;
    }
    return NULL;
}

/* What the listen socket said about a request: interface, destination, time. */
static void tftpd_ancillary(struct msghdr *mh, struct tftpd_request *q)
{
    struct cmsghdr *c;

    for (c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO
            && c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof(pi));
            q->ifindex = pi.ipi_ifindex;
            memcpy(q->dst, &pi.ipi_addr, 4);
            q->dstlen = 4;
        } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO
                   && c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof(pi));
            q->ifindex = (int)pi.ipi6_ifindex;
            memcpy(q->dst, &pi.ipi6_addr, 16);
            q->dstlen = 16;
        } else if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS
                   && c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof(ts));
            q->arrival = (double)ts.tv_sec + ts.tv_nsec / 1e9;
        }
    }
}

/* The IP_PKTINFO / IPV6_PKTINFO that makes a reply leave from `q->dst`. */
static socklen_t tftpd_reply_cmsg(const struct tftpd_request *q, char *buf)
{
    struct cmsghdr *c = (struct cmsghdr *)buf;

    if (q->dstlen == 4) {
        struct in_pktinfo pi;
        memset(&pi, 0, sizeof(pi));
        memcpy(&pi.ipi_spec_dst, q->dst, 4);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(pi));
        memcpy(CMSG_DATA(c), &pi, sizeof(pi));
        return CMSG_SPACE(sizeof(pi));
    }
    if (q->dstlen == 16) {
        struct in6_pktinfo pi;
        memset(&pi, 0, sizeof(pi));
        memcpy(&pi.ipi6_addr, q->dst, 16);
        c->cmsg_level = IPPROTO_IPV6;
        c->cmsg_type = IPV6_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(pi));
        memcpy(CMSG_DATA(c), &pi, sizeof(pi));
        return CMSG_SPACE(sizeof(pi));
    }
    return 0;
}

/* Empty a spare socket of its last client's late datagrams (and a pending ICMP
 * error).  0 when it is quiet; -1 when it keeps receiving or fails. */
static int tftpd_drain(int sock)
{
    char b;
    int i;

    /* One recv() when it is empty, the common case.  A pending error (ICMP
     * port unreachable from the last client) is returned, and cleared, by a
     * recv() like a datagram is. */
    for (i = 0; i < 64; i++) {
        if (recv(sock, &b, 1, MSG_DONTWAIT) >= 0)
            continue; /* a UDP recv drops the whole datagram */
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        if (errno != EINTR && errno != ECONNREFUSED && errno != EHOSTUNREACH
            && errno != ENETUNREACH)
            return -1;
    }
    return -1;
}

/* The known answer's OACK to the request's client, from `sock`: 0 or errno.
 * A lost OACK is the timer's to resend, as after a loss on the wire. */
static int tftpd_send_oack(int sock, const struct tftpd_refusal *r,
                           const struct tftpd_request *q)
{
    ssize_t sent;

    do {
        sent = sendto(sock, r->reply, r->replylen, 0, (const struct sockaddr *)q->src,
                      q->srclen);
    } while (sent < 0 && errno == EINTR);
    return sent < 0 ? errno : 0;
}

/* The same request again while the transfer C started has heard nothing: when
 * the OACK went out TFTPD_RTO_FLOOR_MS or longer ago, the client did not get it
 * (or is a new one on a reused port), so it goes again at once
 * (ReadTransfer.on_repeat). */
static void tftpd_repeat(struct tftpd_xfer *x, const struct tftpd_refusal *r,
                         struct tftpd_request *q, double now)
{
    if (now - x->armed_at < TFTPD_RTO_FLOOR_MS / 1000.0)
        return;
    q->err = tftpd_send_oack(x->sock, r, q);
    x->retransmits++;
    x->retries = 0;
    x->rto = x->base_rto;
    x->resent = 1;
    x->armed_at = now;
}

/* Start the transfer of a known OACK answer: see tftpd_requests in the header.
 * 0 when the OACK went out (or its send failed: q->err), -1 when nothing was
 * taken and Python must serve the request. */
static int tftpd_start(struct tftpd_starts *st, const struct tftpd_refusal *r,
                       struct tftpd_request *q, double now)
{
    struct tftpd_xfer *x;
    struct tftpd_spare sp;
    unsigned int slot;
    int j;

    if (r->xfer == NULL || r->ifindex != q->ifindex || r->dstlen != q->dstlen
        || q->dstlen == 0 || st->nfree == 0
        || st->free_slots == NULL || st->spares == NULL || st->table == NULL)
        return -1;
    if (2 * (st->npeers + 1) > st->peers_len)
        return -1;
    slot = st->free_slots[st->nfree - 1];
    if (slot >= st->table_len || (x = st->table[slot]) == NULL)
        return -1;
    for (j = (int)st->nspares - 1; j >= 0; j--) {
        struct tftpd_spare *c = &st->spares[j];
        if (c->dstlen != q->dstlen || memcmp(c->dst, q->dst, q->dstlen) != 0)
            continue;
        if (tftpd_drain(c->sock) == 0)
            break;
        c->dstlen = 0; /* flooded or broken: Python closes it */
    }
    if (j < 0)
        return -1;
    sp = st->spares[j];
    *x = *r->xfer;
    x->sock = sp.sock;
    x->addrlen = q->srclen;
    memcpy(x->addr, q->src, q->srclen);
    x->fast = 0;
    x->probe = 1;
    x->answer = r->id;
    x->locallen = q->dstlen;
    memcpy(x->local, q->dst, q->dstlen);
    x->sent_at = x->armed_at = now;
    if (tftpd_epoll_set(st->epfd, TFTPD_EPOLL_ADD, sp.sock, slot) < 0) {
        x->addrlen = 0;
        x->probe = 0;
        return -1;
    }
    if (tftpd_peer_put(st, slot) < 0) {
        (void)tftpd_epoll_set(st->epfd, TFTPD_EPOLL_DEL, sp.sock, slot);
        x->addrlen = 0;
        x->probe = 0;
        return -1;
    }
    st->nfree--;
    st->spares[j] = st->spares[st->nspares - 1];
    st->nspares--;
    st->live++;
    q->err = tftpd_send_oack(sp.sock, r, q);
    q->slot = slot;
    return 0;
}

int tftpd_requests(int lsock, int errsock, int pktinfo,
                   const struct tftpd_refusal *table, unsigned int table_len,
                   double now, unsigned int max,
                   struct tftpd_request *out, char *pktbuf, size_t pktbuf_len,
                   struct tftpd_starts *st)
{
    struct mmsghdr in[TFTPD_REQ_BATCH], reply[TFTPD_REQ_BATCH];
    struct iovec iov[TFTPD_REQ_BATCH], riov[TFTPD_REQ_BATCH];
    struct sockaddr_storage src[TFTPD_REQ_BATCH];
    union { char buf[TFTPD_REQ_CMSG]; struct cmsghdr align; } cin[TFTPD_REQ_BATCH],
        cout[TFTPD_REQ_BATCH];
    unsigned int replied[TFTPD_REQ_BATCH]; /* index in out of each reply */
    unsigned int i, nreply = 0, done = 0;
    int n;

    if (out == NULL || pktbuf == NULL)
        return -EINVAL;
    if (max > TFTPD_REQ_BATCH)
        max = TFTPD_REQ_BATCH;
    if (max == 0)
        return 0;
    if (pktbuf_len < (size_t)max * TFTPD_REQ_MAX)
        return -EINVAL;
    memset(in, 0, sizeof(in[0]) * max);
    for (i = 0; i < max; i++) {
        iov[i].iov_base = pktbuf + (size_t)i * TFTPD_REQ_MAX;
        iov[i].iov_len = TFTPD_REQ_MAX;
        in[i].msg_hdr.msg_name = &src[i];
        in[i].msg_hdr.msg_namelen = sizeof(src[i]);
        in[i].msg_hdr.msg_iov = &iov[i];
        in[i].msg_hdr.msg_iovlen = 1;
        in[i].msg_hdr.msg_control = cin[i].buf;
        in[i].msg_hdr.msg_controllen = sizeof(cin[i].buf);
    }
    do {
        n = recvmmsg(lsock, in, max, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;

    for (i = 0; i < (unsigned int)n; i++) {
        struct tftpd_request *q = &out[i];
        const struct tftpd_refusal *r;
        unsigned int len = in[i].msg_len;

        memset(q, 0, sizeof(*q));
        q->off = i * TFTPD_REQ_MAX;
        q->len = len;
        q->truncated = (in[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
        q->srclen = in[i].msg_hdr.msg_namelen <= sizeof(q->src) ? in[i].msg_hdr.msg_namelen : 0;
        memcpy(q->src, &src[i], q->srclen);
        tftpd_ancillary(&in[i].msg_hdr, q);
        if (q->truncated || q->srclen == 0) {
            q->kind = TFTPD_REQ_PASS;
            continue;
        }
        r = tftpd_lookup(table, table_len, pktbuf + q->off, len, now);
        if (st != NULL) {
            int live = tftpd_peer_find(st, q->src, q->srclen);
            if (live >= 0) {
                /* The peer has a transfer: Python merges or supersedes, but the
                 * repeat of a request C answered is merged here. */
                struct tftpd_xfer *x = st->table[live];
                if (x->probe == 1 && r != NULL && r->oack && r->id == x->answer) {
                    q->kind = TFTPD_REQ_MERGED;
                    q->id = r->id;
                    q->slot = (unsigned int)live;
                    tftpd_repeat(x, r, q, now);
                } else {
                    q->kind = TFTPD_REQ_PASS;
                }
                continue;
            }
        }
        if (r != NULL && r->oack) {
            if (st != NULL && tftpd_start(st, r, q, now) == 0) {
                q->kind = TFTPD_REQ_STARTED;
                q->id = r->id;
                q->answered = tftpd_realtime();
            } else {
                q->kind = TFTPD_REQ_PASS;
            }
            continue;
        }
        if (r == NULL) {
            q->kind = TFTPD_REQ_PASS;
            continue;
        }
        q->kind = TFTPD_REQ_ANSWERED;
        q->id = r->id;
        memset(&reply[nreply], 0, sizeof(reply[nreply]));
        riov[nreply].iov_base = (void *)(uintptr_t)r->reply;
        riov[nreply].iov_len = r->replylen;
        reply[nreply].msg_hdr.msg_name = q->src;
        reply[nreply].msg_hdr.msg_namelen = q->srclen;
        reply[nreply].msg_hdr.msg_iov = &riov[nreply];
        reply[nreply].msg_hdr.msg_iovlen = 1;
        if (pktinfo) {
            socklen_t clen = tftpd_reply_cmsg(q, cout[nreply].buf);
            if (clen > 0) {
                reply[nreply].msg_hdr.msg_control = cout[nreply].buf;
                reply[nreply].msg_hdr.msg_controllen = clen;
            }
        }
        replied[nreply++] = i;
    }

    /* The answers, in one call; one that fails is skipped, the rest go on. */
    while (done < nreply) {
        int s = sendmmsg(errsock, reply + done, nreply - done, 0);
        if (s < 0) {
            if (errno == EINTR)
                continue;
            out[replied[done]].err = errno;
            done++;
            continue;
        }
        if (s == 0)
            break;
        done += (unsigned int)s;
    }
    if (nreply > 0) {
        double t = tftpd_realtime();
        for (i = 0; i < nreply; i++) {
            out[replied[i]].answered = t;
            if (i >= done && out[replied[i]].err == 0)
                out[replied[i]].err = EAGAIN;
        }
    }
    return n;
}
