/*
 * variants.c - bench-only senders of TFTP DATA blocks (see variants.h), and
 * the receiver that checks what they sent.  Linux only.
 */
#define _GNU_SOURCE /* sendmmsg, recvmmsg */
#define _FILE_OFFSET_BITS 64

#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "variants.h"

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

#define VB_OPCODE_DATA 3
#define VB_MAX_BLKSIZE 65464
#define VB_EPARTIAL 4097 /* sendfile moved part of a payload: the datagram is broken */

static void vb_header(unsigned char *h, unsigned long long k)
{
    h[0] = 0;
    h[1] = VB_OPCODE_DATA;
    h[2] = (unsigned char)((k >> 8) & 0xff);
    h[3] = (unsigned char)(k & 0xff);
}

/* Bytes of block k (1-based); 0 for the empty block after a full last one. */
static size_t vb_block_len(unsigned long long filesize, unsigned int blksize,
                           unsigned long long k)
{
    unsigned long long off = (k - 1) * blksize;
    unsigned long long left = off < filesize ? filesize - off : 0;
    return left < blksize ? (size_t)left : blksize;
}

static int vb_args_ok(unsigned long long filesize, unsigned int blksize,
                      unsigned long long first, unsigned int count)
{
    unsigned long long nblocks;

    if (blksize < 8 || blksize > VB_MAX_BLKSIZE || first < 1 || count < 1
        || count > INT_MAX || filesize > (unsigned long long)INT64_MAX - VB_MAX_BLKSIZE)
        return 0;
    nblocks = filesize / blksize + 1;
    return first <= nblocks && count - 1 <= nblocks - first;
}

static int vb_back_pressure(int e)
{
    return e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS;
}

static int vb_read_full(int fd, char *buf, size_t len, unsigned long long off)
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
            return -VB_ESHORT;
        done += (size_t)n;
    }
    return 0;
}

/* Send msgs[0..n) with sendmmsg; returns how many went out or -errno. */
static int vb_sendmmsg_all(int sock, struct mmsghdr *msgs, unsigned int n)
{
    unsigned int done = 0;

    while (done < n) {
        int r = sendmmsg(sock, msgs + done, n - done, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (vb_back_pressure(errno))
                return (int)done;
            return -errno;
        }
        if (r == 0)
            return (int)done;
        done += (unsigned int)r;
    }
    return (int)done;
}

/* ---- (c) MSG_MORE header + sendfile, connected ----------------------------- */

int vb_sendfile_window(int sock, int fd, unsigned long long filesize, unsigned int blksize,
                       unsigned long long first, unsigned int count)
{
    unsigned int i;

    if (sock < 0 || fd < 0 || !vb_args_ok(filesize, blksize, first, count))
        return -EINVAL;
    for (i = 0; i < count; i++) {
        unsigned long long k = first + i;
        unsigned char hdr[4];
        size_t len = vb_block_len(filesize, blksize, k);
        off_t off = (off_t)((k - 1) * blksize);
        ssize_t r;

        vb_header(hdr, k);
        do
            r = send(sock, hdr, 4, len ? MSG_MORE : 0);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            return vb_back_pressure(errno) ? (int)i : -errno;
        if (r != 4)
            return -VB_EPARTIAL;
        if (len == 0)
            continue;
        do
            r = sendfile(sock, fd, &off, len);
        while (r < 0 && errno == EINTR);
        /* The header is corked on the socket: any failure now breaks the
         * datagram, back-pressure included, so all of them are errors. */
        if (r < 0)
            return -errno;
        if (r == 0)
            return -VB_ESHORT;
        if ((size_t)r != len)
            return -VB_EPARTIAL;
    }
    return (int)count;
}

/* ---- (d) and (e): iovecs into a mapping ------------------------------------ */

int vb_mmap_sendmsg_window(int sock, const char *addr, unsigned int addrlen,
                           const char *map, unsigned long long filesize,
                           unsigned int blksize, unsigned long long first, unsigned int count)
{
    unsigned int i;

    if (sock < 0 || addr == NULL || map == NULL || addrlen == 0
        || addrlen > sizeof(struct sockaddr_storage)
        || !vb_args_ok(filesize, blksize, first, count))
        return -EINVAL;
    for (i = 0; i < count; i++) {
        unsigned long long k = first + i;
        unsigned char hdr[4];
        struct iovec iov[2];
        struct msghdr mh;
        size_t len = vb_block_len(filesize, blksize, k);
        ssize_t r;

        vb_header(hdr, k);
        iov[0].iov_base = hdr;
        iov[0].iov_len = 4;
        iov[1].iov_base = (void *)(uintptr_t)(map + (k - 1) * blksize);
        iov[1].iov_len = len;
        memset(&mh, 0, sizeof(mh));
        mh.msg_name = (void *)(uintptr_t)addr;
        mh.msg_namelen = addrlen;
        mh.msg_iov = iov;
        mh.msg_iovlen = 2;
        do
            r = sendmsg(sock, &mh, 0);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            return vb_back_pressure(errno) ? (int)i : -errno;
        if ((size_t)r != 4 + len)
            return -VB_EPARTIAL;
    }
    return (int)count;
}

int vb_mmap_sendmmsg_window(int sock, const char *addr, unsigned int addrlen,
                            const char *map, unsigned long long filesize,
                            unsigned int blksize, unsigned long long first, unsigned int count)
{
    struct mmsghdr msgs[VB_MAX_WINDOW];
    struct iovec iov[VB_MAX_WINDOW][2];
    unsigned char hdr[VB_MAX_WINDOW][4];
    unsigned int sent = 0;

    if (sock < 0 || addr == NULL || map == NULL || addrlen == 0
        || addrlen > sizeof(struct sockaddr_storage)
        || !vb_args_ok(filesize, blksize, first, count))
        return -EINVAL;
    while (sent < count) {
        unsigned int n = count - sent, i;
        int r;

        if (n > VB_MAX_WINDOW)
            n = VB_MAX_WINDOW;
        for (i = 0; i < n; i++) {
            unsigned long long k = first + sent + i;

            vb_header(hdr[i], k);
            iov[i][0].iov_base = hdr[i];
            iov[i][0].iov_len = 4;
            iov[i][1].iov_base = (void *)(uintptr_t)(map + (k - 1) * blksize);
            iov[i][1].iov_len = vb_block_len(filesize, blksize, k);
            memset(&msgs[i], 0, sizeof(msgs[i]));
            msgs[i].msg_hdr.msg_name = (void *)(uintptr_t)addr;
            msgs[i].msg_hdr.msg_namelen = addrlen;
            msgs[i].msg_hdr.msg_iov = iov[i];
            msgs[i].msg_hdr.msg_iovlen = 2;
        }
        r = vb_sendmmsg_all(sock, msgs, n);
        if (r < 0)
            return r;
        for (i = 0; i < (unsigned int)r; i++)
            if (msgs[i].msg_len != 4 + iov[i][1].iov_len)
                return -VB_EPARTIAL;
        sent += (unsigned int)r;
        if ((unsigned int)r < n)
            break;
    }
    return (int)sent;
}

/* ---- (f) UDP GSO -------------------------------------------------------------- */

int vb_gso_probe(int sock)
{
    int val = 0;
    socklen_t len = sizeof(val);

    if (getsockopt(sock, SOL_UDP, UDP_SEGMENT, &val, &len) < 0)
        return -errno;
    return 0;
}

/* Read blocks k0 .. k0+n-1 into the payload parts of n slots of `slot` bytes:
 * one preadv, finished by pread when it comes up short. */
static int vb_read_slots(int fd, char *scratch, size_t slot, unsigned long long filesize,
                         unsigned int blksize, unsigned long long k0, unsigned int n)
{
    struct iovec iov[VB_MAX_WINDOW];
    unsigned long long off = (k0 - 1) * blksize;
    size_t total = 0;
    ssize_t got;
    unsigned int i;

    for (i = 0; i < n; i++) {
        iov[i].iov_base = scratch + i * slot + 4;
        iov[i].iov_len = vb_block_len(filesize, blksize, k0 + i);
        total += iov[i].iov_len;
    }
    do
        got = preadv(fd, iov, (int)n, (off_t)off);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return -errno;
    if ((size_t)got == total)
        return 0;
    /* Short: finish slot by slot from where preadv stopped. */
    for (i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        int rc;

        if ((size_t)got >= len) {
            got -= (ssize_t)len;
            off += len;
            continue;
        }
        rc = vb_read_full(fd, (char *)iov[i].iov_base + got, len - (size_t)got,
                          off + (unsigned long long)got);
        if (rc < 0)
            return rc;
        off += len;
        got = 0;
    }
    return 0;
}

int vb_gso_window(int sock, const char *addr, unsigned int addrlen, int fd,
                  unsigned long long filesize, unsigned int blksize,
                  unsigned long long first, unsigned int count, unsigned int max_segs,
                  char *scratch, size_t scratch_len)
{
    size_t slot = (size_t)blksize + 4;
    unsigned int batch, sent = 0;

    if (sock < 0 || fd < 0 || addr == NULL || scratch == NULL || addrlen == 0
        || addrlen > sizeof(struct sockaddr_storage) || max_segs < 1
        || !vb_args_ok(filesize, blksize, first, count))
        return -EINVAL;
    batch = count < VB_MAX_WINDOW ? count : VB_MAX_WINDOW;
    if (scratch_len < batch * slot)
        return -EINVAL;

    while (sent < count) {
        unsigned long long k0 = first + sent;
        unsigned int n = count - sent, i, done = 0;
        int rc;

        if (n > batch)
            n = batch;
        rc = vb_read_slots(fd, scratch, slot, filesize, blksize, k0, n);
        if (rc < 0)
            return rc;
        for (i = 0; i < n; i++)
            vb_header((unsigned char *)scratch + i * slot, k0 + i);

        while (done < n) {
            union {
                char buf[CMSG_SPACE(sizeof(uint16_t))];
                struct cmsghdr align;
            } ctrl;
            struct cmsghdr *cm;
            struct msghdr mh;
            struct iovec iov;
            unsigned int segs = n - done;
            size_t len;
            uint16_t gso = (uint16_t)slot;
            ssize_t r;

            if (segs > max_segs)
                segs = max_segs;
            /* Only the file's last block may be short, so only a last segment. */
            len = (size_t)(segs - 1) * slot + 4
                + vb_block_len(filesize, blksize, k0 + done + segs - 1);
            iov.iov_base = scratch + done * slot;
            iov.iov_len = len;
            memset(&mh, 0, sizeof(mh));
            memset(&ctrl, 0, sizeof(ctrl));
            mh.msg_name = (void *)(uintptr_t)addr;
            mh.msg_namelen = addrlen;
            mh.msg_iov = &iov;
            mh.msg_iovlen = 1;
            mh.msg_control = ctrl.buf;
            mh.msg_controllen = sizeof(ctrl.buf);
            cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            memcpy(CMSG_DATA(cm), &gso, sizeof(gso));
            do
                r = sendmsg(sock, &mh, 0);
            while (r < 0 && errno == EINTR);
            if (r < 0)
                return vb_back_pressure(errno) ? (int)(sent + done) : -errno;
            if ((size_t)r != len)
                return -VB_EPARTIAL;
            done += segs;
        }
        sent += n;
    }
    return (int)sent;
}

/* ---- (g) pread + sendmmsg, connected ------------------------------------------ */

int vb_pread_sendmmsg_connected(int sock, int fd, unsigned long long filesize,
                                unsigned int blksize, unsigned long long first,
                                unsigned int count, char *scratch, size_t scratch_len)
{
    struct mmsghdr msgs[VB_MAX_WINDOW];
    struct iovec iov[VB_MAX_WINDOW][2];
    unsigned char hdr[VB_MAX_WINDOW][4];
    size_t batch;
    unsigned int sent = 0;

    if (sock < 0 || fd < 0 || scratch == NULL
        || !vb_args_ok(filesize, blksize, first, count))
        return -EINVAL;
    batch = scratch_len / blksize;
    if (batch < 1)
        return -EINVAL;
    if (batch > VB_MAX_WINDOW)
        batch = VB_MAX_WINDOW;

    while (sent < count) {
        unsigned long long k0 = first + sent;
        unsigned long long off = (k0 - 1) * blksize;
        unsigned long long end;
        unsigned int n = count - sent, i;
        int rc;

        if (n > batch)
            n = (unsigned int)batch;
        end = off + (unsigned long long)n * blksize;
        if (end > filesize)
            end = filesize;
        rc = vb_read_full(fd, scratch, (size_t)(end - off), off);
        if (rc < 0)
            return rc;
        for (i = 0; i < n; i++) {
            vb_header(hdr[i], k0 + i);
            iov[i][0].iov_base = hdr[i];
            iov[i][0].iov_len = 4;
            iov[i][1].iov_base = scratch + (size_t)i * blksize;
            iov[i][1].iov_len = vb_block_len(filesize, blksize, k0 + i);
            memset(&msgs[i], 0, sizeof(msgs[i]));
            msgs[i].msg_hdr.msg_iov = iov[i];
            msgs[i].msg_hdr.msg_iovlen = 2;
        }
        rc = vb_sendmmsg_all(sock, msgs, n);
        if (rc < 0)
            return rc;
        sent += (unsigned int)rc;
        if ((unsigned int)rc < n)
            break;
    }
    return (int)sent;
}

/* ---- the receiver -------------------------------------------------------------- */

#define VB_RX_BATCH 64
#define VB_RX_SLOT 65536
#define VB_RX_PEEK 64 /* bytes copied out of the datagrams not compared in full */

static double vb_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* `len` is the datagram's real length (MSG_TRUNC), `avail` the bytes copied out. */
static void vb_check(const unsigned char *d, size_t len, size_t avail, const char *file,
                     unsigned long long nfull, unsigned int blksize,
                     unsigned long long *prev, struct vb_rx_stats *st)
{
    unsigned long long k;
    size_t cmp;

    if (len != (size_t)blksize + 4 || avail < 4) {
        st->bad_len++;
        if (!st->first_bad_block)
            st->first_bad_block = avail >= 4 ? ((unsigned long long)d[2] << 8 | d[3]) : 1;
        return;
    }
    k = (unsigned long long)d[2] << 8 | d[3];
    if (d[0] != 0 || d[1] != VB_OPCODE_DATA || k < 1 || k > nfull) {
        st->bad_header++;
        if (!st->first_bad_block)
            st->first_bad_block = k ? k : 1;
        return;
    }
    if (*prev && k != *prev + 1 && k != 1)
        st->out_of_seq++;
    *prev = k;
    cmp = (avail < len ? avail : len) - 4;
    if (avail >= len)
        st->checked++;
    else
        st->prefix_checked++;
    if (memcmp(d + 4, file + (k - 1) * blksize, cmp) != 0) {
        st->bad_payload++;
        if (!st->first_bad_block)
            st->first_bad_block = k;
    }
}

int vb_rx_run(int rxfd, int *stop, const char *file, unsigned long long filesize,
              unsigned int blksize, unsigned int grace_ms, struct vb_rx_stats *st)
{
    struct mmsghdr msgs[VB_RX_BATCH];
    struct iovec iov[VB_RX_BATCH];
    unsigned long long nfull, prev = 0;
    double idle_since = 0;
    char *bufs;
    int i;

    memset(st, 0, sizeof(*st));
    if (rxfd < 0 || stop == NULL || file == NULL || blksize < 8 || blksize > VB_MAX_BLKSIZE)
        return -EINVAL;
    /* The bench walks the full blocks of the file; their numbers never wrap. */
    nfull = filesize / blksize;
    if (nfull < 1 || nfull > 65535)
        return -EINVAL;
    bufs = malloc((size_t)VB_RX_BATCH * VB_RX_SLOT);
    if (bufs == NULL)
        return -ENOMEM;

    for (;;) {
        /* The first 64 datagrams, and then the first of every batch, are copied
         * out whole and compared byte for byte; the rest only as far as
         * VB_RX_PEEK bytes (header + payload prefix), their real length coming
         * back through MSG_TRUNC, so the receiver keeps up with the sender. */
        int all = st->received < 64;
        int n;

        for (i = 0; i < VB_RX_BATCH; i++) {
            iov[i].iov_base = bufs + (size_t)i * VB_RX_SLOT;
            iov[i].iov_len = (all || i == 0) ? VB_RX_SLOT : VB_RX_PEEK;
            memset(&msgs[i], 0, sizeof(msgs[i]));
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        n = recvmmsg(rxfd, msgs, VB_RX_BATCH, MSG_DONTWAIT | MSG_TRUNC, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                st->err = errno;
                break;
            }
            if (!__atomic_load_n(stop, __ATOMIC_ACQUIRE))
                continue; /* spin: the sender never has to wake us */
            if (idle_since == 0)
                idle_since = vb_now();
            else if (vb_now() - idle_since > grace_ms / 1000.0)
                break;
            continue;
        }
        idle_since = 0;
        for (i = 0; i < n; i++) {
            size_t len = msgs[i].msg_len;
            size_t avail = len < iov[i].iov_len ? len : iov[i].iov_len;

            st->received++;
            st->bytes += len;
            vb_check((const unsigned char *)iov[i].iov_base, len, avail, file, nfull,
                     blksize, &prev, st);
        }
    }
    free(bufs);
    return st->err ? -st->err : 0;
}
