/*
 * tftpd_requests.c - request intake: read a batch of requests from a listen
 * socket with their ancillary data, answer the known ones (an ERROR, or an
 * OACK that starts a transfer C owns), and pass the rest to Python.
 */

#define _GNU_SOURCE /* sendmmsg(), recvmmsg(), struct in6_pktinfo */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "tftpd_internal.h"

#ifndef SCM_TIMESTAMPNS
#define SCM_TIMESTAMPNS 35 /* SO_TIMESTAMPNS, asm-generic/socket.h */
#endif
/* Room for IPV6_PKTINFO (or IP_PKTINFO) and a struct timespec, aligned. */
#define TFTPD_REQ_CMSG 128

static double tftpd_realtime(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_REALTIME, &ts) < 0)
        return 0.0;
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* What the listen socket said about a request: interface, destination, time.
 * Python twin: tftpd.datapath.net.from_ancillary. */
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

/* The IP_PKTINFO / IPV6_PKTINFO that makes a reply leave from `q->dst`.
 * Python twin: tftpd.datapath.net.pktinfo_cmsg. */
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

/* See the header.  Python twin: tftpd.datapath.net.drained. */
int tftpd_drain(int sock)
{
    char b;
    int i;

    /* One recv() when it is empty, the common case.  A pending error (ICMP
     * port unreachable from the last client) is returned, and cleared, by a
     * recv() like a datagram is. */
    for (i = 0; i < TFTPD_DRAIN_MAX; i++) {
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
static int tftpd_send_oack(int sock, const struct tftpd_known_answer *r,
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
 * (or is a new one on a reused port), so it goes again at once.  Such a repeat
 * counts as a try, as a timeout does: a spoofed request repeated does not hold
 * the slot longer than TFTPD_UNANSWERED_RETRIES tries.
 * Python twin: tftpd.transfer.ReadTransfer.on_repeat (its OACK_SENT case). */
static void tftpd_repeat(struct tftpd_xfer *x, const struct tftpd_known_answer *r,
                         struct tftpd_request *q, double now)
{
    if (now - x->armed_at < TFTPD_RTO_FLOOR_MS / 1000.0 || x->last_acked > 0
        || x->retries >= TFTPD_UNANSWERED_RETRIES)
        return;
    q->err = tftpd_send_oack(x->sock, r, q);
    x->retransmits++;
    x->retries++;
    x->resent = 1;
    x->armed_at = now;
}

/* Start the transfer of a known OACK answer: see tftpd_requests in the header.
 * 0 when the OACK went out (or its send failed: q->err), -1 when nothing was
 * taken and Python must serve the request. */
static int tftpd_start(struct tftpd_starts *st, const struct tftpd_known_answer *r,
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
    x->owner = TFTPD_OWNER_C;
    x->answer = r->id;
    x->locallen = q->dstlen;
    memcpy(x->local, q->dst, q->dstlen);
    x->sent_at = x->armed_at = now;
    if (tftpd_epoll_set(st->epfd, TFTPD_EPOLL_ADD, sp.sock, slot) < 0) {
        x->addrlen = 0;
        x->owner = TFTPD_OWNER_PYTHON;
        return -1;
    }
    if (tftpd_peer_put(st, slot) < 0) {
        (void)tftpd_epoll_set(st->epfd, TFTPD_EPOLL_DEL, sp.sock, slot);
        x->addrlen = 0;
        x->owner = TFTPD_OWNER_PYTHON;
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
                   const struct tftpd_known_answer *table, unsigned int table_len,
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
        const struct tftpd_known_answer *r;
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
                if (x->owner == TFTPD_OWNER_C && r != NULL && r->oack && r->id == x->answer) {
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
