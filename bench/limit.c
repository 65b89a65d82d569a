/*
 * limit: the reference "as fast as this machine can" TFTP sender of bench/.
 *
 *   tftpbench-limit [-L] -a HOST:PORT [--workers N] ROOT
 *
 * Reads every regular file under ROOT into memory at start, then serves RRQs (octet,
 * read only) from memory: options blksize, tsize, windowsize, timeout (RFC 2347-2349,
 * 7440), probes (OACK answered by ERROR), ERROR 1 for a missing name. Each transfer gets
 * a socket of its own (a new TID) connected to its client. One epoll loop per worker;
 * workers are forked processes with SO_REUSEPORT listen sockets, so a client's repeated
 * RRQ reaches the worker that already serves it and is merged there. A window is sent with
 * one sendmmsg, header and payload gathered from memory. Retransmission: the client's
 * timeout or 1 s, 5 tries. No WRQ, no netascii, no access control: a yardstick, not a
 * server. Prints "limit: listening on HOST:PORT" on stderr when ready.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WINDOW 64
#define MAX_BLKSIZE 65464
#define RETRIES 5

struct file {
    char *name;
    unsigned char *data;
    size_t size;
};

static struct file *files;
static size_t nfiles, capfiles;
static size_t rootlen;

enum { ST_OACK, ST_DATA };

struct xfer {
    int fd;
    int state;
    struct sockaddr_in peer;
    const struct file *f;
    uint32_t blksize, window;
    uint64_t nblocks;   /* blocks in the file, the last one short (maybe empty) */
    uint64_t base;      /* first block not yet acknowledged */
    uint64_t sent;      /* highest block sent */
    int retries;
    int dup_resent;
    double timeout;
    double deadline;
    size_t slot;
    size_t olen;
    char oack[512];
};

static struct xfer **xfers;
static size_t nxfers, capxfers;
static struct sockaddr_in listen_addr;
static volatile sig_atomic_t stopping;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int add_file(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)ftw;
    if (type != FTW_F || !S_ISREG(sb->st_mode))
        return 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    unsigned char *buf = malloc(sb->st_size ? (size_t)sb->st_size : 1);
    size_t got = 0;
    while (got < (size_t)sb->st_size) {
        ssize_t r = read(fd, buf + got, (size_t)sb->st_size - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (nfiles == capfiles) {
        capfiles = capfiles ? capfiles * 2 : 16;
        files = realloc(files, capfiles * sizeof *files);
    }
    files[nfiles].name = strdup(path + rootlen);
    files[nfiles].data = buf;
    files[nfiles].size = got;
    nfiles++;
    return 0;
}

static const struct file *find_file(const char *name)
{
    while (*name == '/')
        name++;
    for (size_t i = 0; i < nfiles; i++)
        if (strcmp(files[i].name, name) == 0)
            return &files[i];
    return NULL;
}

static void send_error(int fd, int code, const char *msg)
{
    unsigned char pkt[128];
    size_t len = strlen(msg);
    if (len > 100)
        len = 100;
    pkt[0] = 0;
    pkt[1] = 5;
    pkt[2] = (unsigned char)(code >> 8);
    pkt[3] = (unsigned char)code;
    memcpy(pkt + 4, msg, len);
    pkt[4 + len] = 0;
    (void)send(fd, pkt, 5 + len, MSG_DONTWAIT);
}

static void xfer_free(int ep, struct xfer *x)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, x->fd, NULL);
    close(x->fd);
    size_t s = x->slot;
    xfers[s] = xfers[--nxfers];
    xfers[s]->slot = s;
    free(x);
}

/* Send blocks [from, from + window) that exist, one sendmmsg. */
static void send_window(struct xfer *x, uint64_t from)
{
    struct mmsghdr msgs[MAX_WINDOW];
    struct iovec iov[MAX_WINDOW][2];
    unsigned char hdr[MAX_WINDOW][4];
    unsigned n = 0;
    for (uint64_t b = from; b < from + x->window && b <= x->nblocks; b++, n++) {
        uint64_t off = (b - 1) * x->blksize;
        size_t len = x->f->size - off < x->blksize ? x->f->size - off : x->blksize;
        hdr[n][0] = 0;
        hdr[n][1] = 3;
        hdr[n][2] = (unsigned char)(b >> 8);
        hdr[n][3] = (unsigned char)b;
        iov[n][0].iov_base = hdr[n];
        iov[n][0].iov_len = 4;
        iov[n][1].iov_base = x->f->data + off;
        iov[n][1].iov_len = len;
        memset(&msgs[n], 0, sizeof msgs[n]);
        msgs[n].msg_hdr.msg_iov = iov[n];
        msgs[n].msg_hdr.msg_iovlen = 2;
    }
    unsigned done = 0;
    while (done < n) {
        int r = sendmmsg(x->fd, msgs + done, n - done, MSG_DONTWAIT);
        if (r <= 0)
            break; /* a full buffer counts as a loss: the timer resends */
        done += (unsigned)r;
    }
    if (n && from + n - 1 > x->sent)
        x->sent = from + n - 1;
}

static void send_oack(struct xfer *x, const char *opts, size_t optlen)
{
    unsigned char pkt[600];
    pkt[0] = 0;
    pkt[1] = 6;
    memcpy(pkt + 2, opts, optlen);
    (void)send(x->fd, pkt, 2 + optlen, MSG_DONTWAIT);
}

static size_t put_opt(char *buf, size_t at, const char *k, unsigned long long v)
{
    int n = snprintf(buf + at, 600 - at, "%s", k);
    at += (size_t)n + 1;
    n = snprintf(buf + at, 600 - at, "%llu", v);
    return at + (size_t)n + 1;
}

static struct xfer *find_xfer(const struct sockaddr_in *peer)
{
    for (size_t i = 0; i < nxfers; i++)
        if (xfers[i]->peer.sin_port == peer->sin_port &&
            xfers[i]->peer.sin_addr.s_addr == peer->sin_addr.s_addr)
            return xfers[i];
    return NULL;
}

static void handle_rrq(int ep, const unsigned char *pkt, size_t len, struct sockaddr_in *peer)
{
    if (find_xfer(peer))
        return; /* a repeated RRQ of a live transfer: merged */
    char req[1024];
    if (len < 4 || len - 2 >= sizeof req)
        return;
    memcpy(req, pkt + 2, len - 2);
    req[len - 2] = 0;
    size_t rlen = len - 2;
    /* fields: name, mode, then option pairs */
    char *fields[64];
    size_t nf = 0;
    size_t at = 0;
    while (at < rlen && nf < 64) {
        fields[nf++] = req + at;
        at += strlen(req + at) + 1;
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    struct sockaddr_in local = listen_addr;
    local.sin_port = 0;
    if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0 ||
        connect(fd, (struct sockaddr *)peer, sizeof *peer) < 0) {
        close(fd);
        return;
    }
    if (nf < 2) {
        send_error(fd, 4, "malformed request");
        close(fd);
        return;
    }
    if (strcasecmp(fields[1], "octet") != 0) {
        send_error(fd, 0, "octet only");
        close(fd);
        return;
    }
    const struct file *f = find_file(fields[0]);
    if (!f) {
        send_error(fd, 1, "File not found");
        close(fd);
        return;
    }
    struct xfer *x = calloc(1, sizeof *x);
    x->fd = fd;
    x->peer = *peer;
    x->f = f;
    x->blksize = 512;
    x->window = 1;
    x->timeout = 1.0;
    char oack[600];
    size_t olen = 0;
    for (size_t i = 2; i + 1 < nf; i += 2) {
        const char *k = fields[i];
        unsigned long long v = strtoull(fields[i + 1], NULL, 10);
        if (olen > 400)
            break;
        if (strcasecmp(k, "blksize") == 0 && v >= 8) {
            x->blksize = v > MAX_BLKSIZE ? MAX_BLKSIZE : (uint32_t)v;
            olen = put_opt(oack, olen, "blksize", x->blksize);
        } else if (strcasecmp(k, "tsize") == 0) {
            olen = put_opt(oack, olen, "tsize", f->size);
        } else if (strcasecmp(k, "windowsize") == 0 && v >= 1) {
            x->window = v > MAX_WINDOW ? MAX_WINDOW : (uint32_t)v;
            olen = put_opt(oack, olen, "windowsize", x->window);
        } else if (strcasecmp(k, "timeout") == 0 && v >= 1 && v <= 255) {
            x->timeout = (double)v;
            olen = put_opt(oack, olen, "timeout", v);
        }
    }
    x->nblocks = f->size / x->blksize + 1;
    x->base = 1;
    x->sent = 0;
    if (nxfers == capxfers) {
        capxfers = capxfers ? capxfers * 2 : 1024;
        xfers = realloc(xfers, capxfers * sizeof *xfers);
    }
    x->slot = nxfers;
    xfers[nxfers++] = x;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = x};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    x->deadline = now_s() + x->timeout;
    if (olen) {
        x->state = ST_OACK;
        memcpy(x->oack, oack, olen);
        x->olen = olen;
        send_oack(x, oack, olen);
    } else {
        x->state = ST_DATA;
        send_window(x, 1);
    }
}

static void handle_xfer(int ep, struct xfer *x, double now)
{
    unsigned char pkt[1024];
    for (int i = 0; i < 64; i++) {
        ssize_t n = recv(x->fd, pkt, sizeof pkt, MSG_DONTWAIT);
        if (n < 0)
            return;
        if (n < 4)
            continue;
        unsigned op = (unsigned)(pkt[0] << 8 | pkt[1]);
        if (op == 5) { /* ERROR: probe done or client abort */
            xfer_free(ep, x);
            return;
        }
        if (op != 4)
            continue;
        unsigned a16 = (unsigned)(pkt[2] << 8 | pkt[3]);
        if (x->state == ST_OACK) {
            if (a16 != 0)
                continue;
            x->state = ST_DATA;
            x->retries = 0;
            x->dup_resent = 0;
            send_window(x, 1);
            x->deadline = now + x->timeout;
            continue;
        }
        /* map the 16-bit ACK onto the 64-bit block counter around base - 1 */
        uint64_t last = x->base - 1;
        uint64_t ack = last + (uint64_t)((a16 - (unsigned)(last & 0xFFFF)) & 0xFFFF);
        if (ack > x->sent) {
            continue; /* older than base - 1 after wrap: a stale duplicate */
        }
        if (ack == x->nblocks) {
            xfer_free(ep, x);
            return;
        }
        if (ack == last) {
            /* duplicate ACK: with a window it reports a lost first block; resend once */
            if (x->window > 1 && !x->dup_resent) {
                x->dup_resent = 1;
                send_window(x, x->base);
                x->deadline = now + x->timeout;
            }
            continue;
        }
        x->base = ack + 1;
        x->retries = 0;
        x->dup_resent = 0;
        send_window(x, x->base);
        x->deadline = now + x->timeout;
    }
}

static void on_term(int sig)
{
    (void)sig;
    stopping = 1;
}

static int open_listen(const struct sockaddr_in *addr)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1, buf = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        perror("limit: bind");
        exit(1);
    }
    return fd;
}

static void worker(int lfd)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[256];
    unsigned char pkt[2048];
    double next_scan = now_s() + 0.05;
    while (!stopping) {
        int n = epoll_wait(ep, evs, 256, 50);
        double now = now_s();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                for (int k = 0; k < 64; k++) {
                    struct sockaddr_in peer;
                    socklen_t pl = sizeof peer;
                    ssize_t r = recvfrom(lfd, pkt, sizeof pkt, MSG_DONTWAIT,
                                         (struct sockaddr *)&peer, &pl);
                    if (r < 0)
                        break;
                    if (r >= 4 && pkt[0] == 0 && pkt[1] == 1)
                        handle_rrq(ep, pkt, (size_t)r, &peer);
                }
            } else {
                handle_xfer(ep, (struct xfer *)evs[i].data.ptr, now);
            }
        }
        if (now >= next_scan) {
            next_scan = now + 0.05;
            for (size_t i = 0; i < nxfers;) {
                struct xfer *x = xfers[i];
                if (x->deadline > now) {
                    i++;
                    continue;
                }
                if (++x->retries > RETRIES) {
                    xfer_free(ep, x);
                    continue; /* slot i now holds another transfer */
                }
                x->deadline = now + x->timeout;
                x->dup_resent = 0;
                if (x->state == ST_OACK)
                    send_oack(x, x->oack, x->olen);
                else
                    send_window(x, x->base);
                i++;
            }
        }
    }
}

int main(int argc, char **argv)
{
    const char *addr = "127.0.0.1:69";
    const char *root = NULL;
    int workers = 2;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-a") == 0 && i + 1 < argc)
            addr = argv[++i];
        else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc)
            workers = atoi(argv[++i]);
        else if (strcmp(argv[i], "-L") == 0)
            continue;
        else if (argv[i][0] != '-')
            root = argv[i];
        else {
            fprintf(stderr, "usage: %s [-L] -a HOST:PORT [--workers N] ROOT\n", argv[0]);
            return 2;
        }
    }
    if (!root || workers < 1) {
        fprintf(stderr, "usage: %s [-L] -a HOST:PORT [--workers N] ROOT\n", argv[0]);
        return 2;
    }
    char host[64];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof host) {
        fprintf(stderr, "limit: bad address %s\n", addr);
        return 2;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = 0;
    memset(&listen_addr, 0, sizeof listen_addr);
    listen_addr.sin_family = AF_INET;
    listen_addr.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &listen_addr.sin_addr) != 1) {
        fprintf(stderr, "limit: bad address %s\n", addr);
        return 2;
    }
    char rootbuf[4096];
    if (!realpath(root, rootbuf)) {
        perror("limit: root");
        return 1;
    }
    rootlen = strlen(rootbuf) + 1;
    if (nftw(rootbuf, add_file, 32, FTW_PHYS) != 0) {
        perror("limit: reading root");
        return 1;
    }
    if (workers > 64)
        workers = 64;
    int lfds[64];
    lfds[0] = open_listen(&listen_addr);
    socklen_t sl = sizeof listen_addr;
    getsockname(lfds[0], (struct sockaddr *)&listen_addr, &sl);
    for (int w = 1; w < workers; w++)
        lfds[w] = open_listen(&listen_addr);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    pid_t kids[64];
    int nkids = 0;
    pid_t parent = getpid();
    for (int w = 1; w < workers; w++) {
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent)
                _exit(0);
            for (int k = 0; k < workers; k++)
                if (k != w)
                    close(lfds[k]);
            worker(lfds[w]);
            _exit(0);
        }
        if (pid > 0)
            kids[nkids++] = pid;
    }
    for (int k = 1; k < workers; k++)
        close(lfds[k]);
    int lfd = lfds[0];
    fprintf(stderr, "limit: listening on %s:%u\n", host, ntohs(listen_addr.sin_port));
    fflush(stderr);
    worker(lfd);
    for (int k = 0; k < nkids; k++)
        kill(kids[k], SIGTERM);
    for (int k = 0; k < nkids; k++)
        waitpid(kids[k], NULL, 0);
    return 0;
}
