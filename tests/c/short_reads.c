/*
 * short_reads.c - tftpd_send_window over a file system whose reads come up
 * short, as a network file system's may.
 *
 * The program defines preadv() and pread() itself (with 64-bit file offsets
 * the headers name them preadv64 and pread64, as the data path calls them),
 * so the data path linked into it gets at most CHUNK bytes per call.  It sends `count` blocks of the
 * file it is given to a loopback socket of its own, with UDP segmentation and
 * without, reads every datagram back and checks each against the file.
 * Exit 0 when every datagram holds the right header and bytes; 1 with a
 * message on the first that does not.
 *
 * usage: short_reads FILE BLKSIZE FIRST COUNT CHUNK
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tftpd_datapath.h"

static size_t chunk = 1000;
static unsigned long short_calls;

/* At most `chunk` bytes per call, across the iovecs, straight from the
 * kernel's pread64 (no libc wrapper: we replace those). */
static ssize_t short_preadv(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    size_t done = 0;
    int i;

    for (i = 0; i < iovcnt && done < chunk; i++) {
        size_t want = iov[i].iov_len;
        long r;

        if (want > chunk - done)
            want = chunk - done;
        if (want == 0)
            continue;
        r = syscall(SYS_pread64, fd, iov[i].iov_base, want, off + (off_t)done);
        if (r < 0)
            return done > 0 ? (ssize_t)done : -1;
        done += (size_t)r;
        if ((size_t)r < want)
            break;
    }
    short_calls++;
    return (ssize_t)done;
}

ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    return short_preadv(fd, iov, iovcnt, off);
}

ssize_t pread(int fd, void *buf, size_t len, off_t off)
{
    struct iovec v = {buf, len};
    return short_preadv(fd, &v, 1, off);
}

static int check(const char *what, int rx, const unsigned char *file, unsigned long long size,
                 unsigned int blksize, unsigned long long first, unsigned int count)
{
    static unsigned char buf[70000];
    unsigned int i;

    for (i = 0; i < count; i++) {
        unsigned long long k = first + i, off = (k - 1) * blksize;
        size_t want = size - off < blksize ? (size_t)(size - off) : blksize;
        unsigned int wire = tftpd_wire_block(k, 0);
        ssize_t n = recv(rx, buf, sizeof(buf), 0);

        if (n < 0) {
            printf("%s: block %llu: recv: %s\n", what, k, strerror(errno));
            return 1;
        }
        if ((size_t)n != want + 4 || buf[0] != 0 || buf[1] != 3
            || buf[2] != (wire >> 8) || buf[3] != (wire & 0xff)) {
            printf("%s: block %llu: %zd bytes, header %02x%02x %02x%02x\n", what, k, n,
                   buf[0], buf[1], buf[2], buf[3]);
            return 1;
        }
        if (memcmp(buf + 4, file + off, want) != 0) {
            printf("%s: block %llu: payload differs from the file\n", what, k);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof(a);
    struct timeval tv = {5, 0};
    struct stat st;
    unsigned char *file;
    static char scratch[1 << 20];
    unsigned int blksize, count, gso;
    unsigned long long first;
    int fd, tx, rx, rc, pass, shrank = 0;
    int rcvbuf = 8 << 20;

    if (argc != 6)
        return 2;
    fd = open(argv[1], O_RDONLY);
    blksize = (unsigned int)strtoul(argv[2], NULL, 10);
    first = strtoull(argv[3], NULL, 10);
    count = (unsigned int)strtoul(argv[4], NULL, 10);
    chunk = strtoul(argv[5], NULL, 10);
    if (fd < 0 || fstat(fd, &st) < 0 || chunk == 0)
        return 2;
    file = malloc((size_t)st.st_size + 1);
    if (file == NULL || syscall(SYS_pread64, fd, file, (size_t)st.st_size, 0)
                            != (long)st.st_size)
        return 2;

    rx = socket(AF_INET, SOCK_DGRAM, 0);
    tx = socket(AF_INET, SOCK_DGRAM, 0);
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (rx < 0 || tx < 0 || bind(rx, (struct sockaddr *)&a, sizeof(a)) < 0
        || getsockname(rx, (struct sockaddr *)&a, &alen) < 0
        || setsockopt(rx, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)) < 0
        || setsockopt(rx, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0)
        return 2;

    for (pass = 0; pass < 2; pass++) {
        const char *what = pass ? "sendmmsg" : "gso";
        short_calls = 0;
        gso = pass ? 0 : 1;
        rc = tftpd_send_window(tx, (const char *)&a, sizeof(a), fd, NULL,
                               (unsigned long long)st.st_size, blksize, first, count, 0,
                               scratch, sizeof(scratch), &gso, &shrank);
        if (shrank) {
            printf("%s: tftpd_send_window found the file shrunk\n", what);
            return 1;
        }
        if (rc != (int)count) {
            printf("%s: tftpd_send_window returned %d, not %u\n", what, rc, count);
            return 1;
        }
        if (pass == 0 && !gso) {
            printf("gso: the kernel refused UDP segmentation; nothing was checked\n");
            return 3;
        }
        if (check(what, rx, file, (unsigned long long)st.st_size, blksize, first, count))
            return 1;
        printf("%s: %u blocks whole after %lu short reads\n", what, count, short_calls);
    }
    return 0;
}
