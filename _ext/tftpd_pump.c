/*
 * tftpd_pump.c - the pump: one epoll set of transfer sockets (and Python's own
 * descriptors, as tokens), served in C ACK after ACK until there is something
 * for Python; and the end of a transfer C started when its peer answers the
 * OACK with ERROR 0, 8 or 9 (an existence probe).
 */

#define _GNU_SOURCE /* sendmmsg(), recvmmsg(), struct in6_pktinfo */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "tftpd_internal.h"

#define TFTPD_PUMP_READY_MAX 256 /* epoll events per call (stack array) */
#define TFTPD_PUMP_PER_SOCKET 16 /* datagrams read from one socket per call */
#define TFTPD_PUMP_ROOM 1500     /* pktbuf room kept for one reported datagram */

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

/* A transfer C started heard ERROR 0, 8 or 9: its probe is over.  Returns 1
 * when its slot is offered again.  Its socket leaves the
 * epoll set and is Python's to close: a port that served one client never
 * serves the next (an attacker who learns it learns nothing). */
static unsigned int tftpd_end_probe(struct tftpd_starts *st, int epfd, unsigned int slot,
                                    struct tftpd_xfer *x)
{
    unsigned int back = 0;

    x->owner = TFTPD_OWNER_ENDED;
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
        back = 1;
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
                memset(&events[nev], 0, sizeof(events[nev]));
                events[nev].slot = slot;
                events[nev].kind = TFTPD_EV_ERROR;
                events[nev].err = errno;
                nev++;
                x->fast = 0;
                break;
            }
            if (x->owner == TFTPD_OWNER_C && tftpd_is_probe_end(p, (size_t)len)
                && tftpd_same_peer(x, &src, srclen)) {
                /* An existence probe: the client read tsize and stops. */
                memset(&events[nev], 0, sizeof(events[nev]));
                events[nev].slot = slot;
                events[nev].kind = TFTPD_EV_PROBE;
                events[nev].err = p[3];
                events[nev].offered = tftpd_end_probe(st, epfd, slot, x);
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
                memset(&events[nev], 0, sizeof(events[nev]));
                events[nev].slot = slot;
                if (rc == 1)
                    events[nev].kind = TFTPD_EV_DONE;
                else if (rc == -TFTPD_ESHRANK)
                    events[nev].kind = TFTPD_EV_SHRANK;
                else {
                    events[nev].kind = TFTPD_EV_ERROR;
                    events[nev].err = -rc;
                }
                nev++;
                x->fast = 0;
                break; /* the transfer is over: what follows is Python's */
            }
python:
            memset(&events[nev], 0, sizeof(events[nev]));
            events[nev].slot = slot;
            events[nev].kind = TFTPD_EV_PACKET;
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
