/* A keep-alive HTTP/1.1 load generator for the bench's `http` workload (bench/http.py).
 *
 *   httpload HOST PORT PATH CONNECTIONS SECONDS
 *
 * CONNECTIONS connections each ask for PATH again and again on one connection (a
 * new request once the last response's body is read) until SECONDS are over; one
 * thread, epoll. Each response must be 200 with a Content-Length; its body is read
 * and dropped. Prints one JSON object: requests completed, body bytes, errors,
 * the wall time, and latency percentiles (request sent to body read).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096
#define HEAD_MAX 8192
#define MAX_SAMPLES (1 << 20)

struct conn {
    int fd;
    int head_len;         /* bytes of the response head read so far */
    long long body_left;  /* -1: reading the head */
    double sent_at;
    char head[HEAD_MAX];
};

static struct conn conns[MAX_CONNS];
static char sink[1 << 20];
static char request[1024];
static int request_len;
static struct sockaddr_in6 addr6;
static struct sockaddr_in addr4;
static int use_v6;
static double samples[MAX_SAMPLES];
static long n_samples;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int open_conn(int ep, struct conn *c) {
    int fd = use_v6 ? socket(AF_INET6, SOCK_STREAM, 0) : socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if ((use_v6 ? connect(fd, (struct sockaddr *)&addr6, sizeof addr6)
                : connect(fd, (struct sockaddr *)&addr4, sizeof addr4)) < 0) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static int send_request(struct conn *c) {
    c->head_len = 0;
    c->body_left = -1;
    c->sent_at = now();
    /* A request is small: one blocking send, the socket buffer is empty by now. */
    return send(c->fd, request, request_len, MSG_NOSIGNAL) == request_len ? 0 : -1;
}

/* Parse the head in c->head; returns the bytes of body already read past it, or -1. */
static int parse_head(struct conn *c, int *past) {
    char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
    if (!end)
        return c->head_len >= HEAD_MAX ? -1 : 0;
    *end = 0;
    if (strncmp(c->head, "HTTP/1.1 200", 12) != 0)
        return -1;
    char *cl = strcasestr(c->head, "\r\ncontent-length:");
    if (!cl)
        return -1;
    c->body_left = atoll(cl + 17);
    *past = c->head_len - (int)(end + 4 - c->head);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: httpload HOST PORT PATH CONNECTIONS SECONDS\n");
        return 2;
    }
    int port = atoi(argv[2]), n = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (n < 1 || n > MAX_CONNS || seconds <= 0) {
        fprintf(stderr, "httpload: 1..%d connections, positive seconds\n", MAX_CONNS);
        return 2;
    }
    if (inet_pton(AF_INET, argv[1], &addr4.sin_addr) == 1) {
        addr4.sin_family = AF_INET;
        addr4.sin_port = htons(port);
    } else if (inet_pton(AF_INET6, argv[1], &addr6.sin6_addr) == 1) {
        use_v6 = 1;
        addr6.sin6_family = AF_INET6;
        addr6.sin6_port = htons(port);
    } else {
        fprintf(stderr, "httpload: bad address %s\n", argv[1]);
        return 2;
    }
    request_len = snprintf(request, sizeof request,
                           "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: httpload\r\n\r\n",
                           argv[3], argv[1]);
    int ep = epoll_create1(0);
    long long requests = 0, bytes = 0, errors = 0;
    double start = now(), end = start + seconds;
    int live = 0;
    for (int i = 0; i < n; i++) {
        if (open_conn(ep, &conns[i]) < 0 || send_request(&conns[i]) < 0) {
            errors++;
            continue;
        }
        live++;
    }
    struct epoll_event evs[256];
    while (live > 0) {
        double t = now();
        if (t >= end)
            break;
        int k = epoll_wait(ep, evs, 256, (int)((end - t) * 1000) + 1);
        for (int i = 0; i < k; i++) {
            struct conn *c = evs[i].data.ptr;
            ssize_t got;
            if (c->body_left < 0) {
                got = recv(c->fd, c->head + c->head_len, HEAD_MAX - c->head_len, 0);
                if (got <= 0)
                    goto failed;
                c->head_len += got;
                int past = 0, r = parse_head(c, &past);
                if (r < 0)
                    goto failed;
                if (r == 0)
                    continue;
                c->body_left -= past;
                bytes += past;
            } else {
                got = recv(c->fd, sink, sizeof sink, 0);
                if (got <= 0)
                    goto failed;
                c->body_left -= got;
                bytes += got;
            }
            if (c->body_left == 0) {
                requests++;
                if (n_samples < MAX_SAMPLES)
                    samples[n_samples++] = now() - c->sent_at;
                if (now() < end && send_request(c) == 0)
                    continue;
                if (now() < end)
                    goto failed;
            } else if (c->body_left > 0) {
                continue;
            } else {
                goto failed; /* more bytes than Content-Length said */
            }
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            live--;
            continue;
        failed:
            errors++;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            live--;
        }
    }
    double wall = now() - start;
    qsort(samples, n_samples, sizeof samples[0], cmp_double);
#define PCT(p) (n_samples ? samples[(long)((n_samples - 1) * (p))] : 0.0)
    printf("{\"requests\": %lld, \"bytes\": %lld, \"errors\": %lld, \"wall_s\": %.6f, "
           "\"connections\": %d, \"p50_s\": %.6f, \"p99_s\": %.6f, \"max_s\": %.6f}\n",
           requests, bytes, errors, wall, n, PCT(0.5), PCT(0.99), PCT(1.0));
    return 0;
}
