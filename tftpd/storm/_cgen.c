/*
 * The storm's C core: the same client state machine as pyengine.py's Python engine (read
 * that first: this is a transcription), one epoll loop over every client socket, so that
 * the generator is never what limits a storm. Compiled with cc at first use (cgen.py);
 * Python prepares the steps and reads the results. The fault layer is _cgen_faults.c.
 */
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_cgen_int.h"

static void send_ack(struct storm *s, struct client *c, unsigned blk)
{
    unsigned char a[4] = {0, 4, (unsigned char)(blk >> 8), (unsigned char)blk};
    (void)tb_send(s, c, a, 4, &c->tid);
}

static void send_err(struct storm *s, struct client *c, int code, const char *msg,
                     const struct sockaddr_in *to)
{
    unsigned char p[64];
    size_t l = strlen(msg);
    p[0] = 0;
    p[1] = 5;
    p[2] = 0;
    p[3] = (unsigned char)code;
    memcpy(p + 4, msg, l + 1);
    (void)tb_send(s, c, p, 5 + l, to);
}

static void close_sock(struct storm *s, struct client *c)
{
    if (c->fd >= 0) {
        epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
}

static void fail(struct storm *s, struct client *c, int reason)
{
    if (c->state == S_DONE || c->state == S_FAILED)
        return;
    if (c->fd >= 0 && c->has_tid)
        send_err(s, c, 0, "client abort", &c->tid);
    close_sock(s, c);
    c->state = S_FAILED;
    s->out[c - s->c].reason = reason;
    s->res->requests_failed++;
}

static void send_rrq(struct storm *s, struct client *c, double now)
{
    const struct tb_step *st = &s->steps[c->step];
    ssize_t r = tb_send(s, c, st->rrq, st->rrq_len, &s->server);
    if (r < 0 && errno != EAGAIN && errno != ENOBUFS) {
        fail(s, c, TB_R_SEND);
        return;
    }
    s->res->rrq_sent++;
    if (c->rrq_try)
        s->res->rrq_retransmits++;
    c->deadline = now + s->cfg->rrq_timeouts[c->rrq_try];
    c->rrq_try++;
}

/* The tsize client c was told at `step` (TB_SIZE_UNKNOWN until told). */
static uint64_t *announced(struct storm *s, struct client *c, int step)
{
    return &s->announced[(size_t)(c - s->c) * (size_t)s->cfg->nsteps + (size_t)step];
}

static void start_step(struct storm *s, struct client *c, double now)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail(s, c, TB_R_SOCKET);
        return;
    }
    for (int i = 0; i < 64; i++) {
        struct sockaddr_in me = {.sin_family = AF_INET};
        unsigned port = s->next_port;
        s->next_port = port + 1 < PORT_HI ? port + 1 : PORT_LO;
        me.sin_port = htons((uint16_t)port);
        if (bind(fd, (struct sockaddr *)&me, sizeof me) == 0)
            break;
    }
    c->fd = fd;
    c->gen++;
    c->nout = 0;
    c->nin = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(c - s->c)};
    epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev);
    c->has_tid = 0;
    c->wrong_tid = 0;
    c->blksize = 512;
    c->window = 1;
    c->inwin = 0;
    c->nblk = 1;
    const struct tb_step *st = &s->steps[c->step];
    c->size = st->known ? st->size
            : st->size_from >= 0 ? *announced(s, c, st->size_from) : TB_SIZE_UNKNOWN;
    c->gap_acked = 0;
    c->retries = 0;
    c->acked = -1;
    c->state = S_WAIT_FIRST;
    c->rrq_try = 0;
    c->t_req = now;
    send_rrq(s, c, now);
}

static void step_done(struct storm *s, struct client *c, double now)
{
    s->res->requests_ok++;
    c->has_tid = 0;
    close_sock(s, c);
    c->step++;
    if (c->step == s->cfg->nsteps) {
        c->iteration++;
        if (s->cfg->repeat_max > 0 && c->iteration < s->cfg->repeat_max && now < c->loop_end) {
            c->step = 0;
        } else {
            c->state = S_DONE;
            s->res->ok++;
            s->out[c - s->c].completion = now - c->started;
            return;
        }
    }
    start_step(s, c, now);
}

static void on_timeout(struct storm *s, struct client *c, double now)
{
    const struct tb_config *cfg = s->cfg;
    if (c->state == S_WAIT_FIRST) {
        if (c->rrq_try < cfg->n_rrq_timeouts)
            send_rrq(s, c, now);
        else
            fail(s, c, c->wrong_tid ? TB_R_WRONG_TID : TB_R_RRQ_TIMEOUT);
        return;
    }
    if (c->retries >= cfg->ack_retries) {
        fail(s, c, c->wrong_tid ? TB_R_WRONG_TID : TB_R_DATA_TIMEOUT);
        return;
    }
    c->retries++;
    s->res->ack_retransmits++;
    c->inwin = 0;
    c->acked = (int)((c->nblk - 1) & 0xFFFF);
    send_ack(s, c, (unsigned)c->acked);
    c->deadline = now + cfg->ack_timeout;
}

static int parse_uint(const char *p, const char *end, uint64_t *v)
{
    if (p == end)
        return -1;
    uint64_t x = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9' || x > 1000000000000ULL)
            return -1;
        x = x * 10 + (uint64_t)(*p - '0');
    }
    *v = x;
    return 0;
}

static void on_oack(struct storm *s, struct client *c, const unsigned char *b, size_t n,
                    double now)
{
    const struct tb_step *st = &s->steps[c->step];
    if (c->state != S_WAIT_FIRST) {
        if (c->state == S_WAIT_OACK_DONE) {
            s->res->duplicate_data++;
            send_ack(s, c, 0);
            return;
        }
        if (c->state == S_DATA) {
            /* A repeated OACK overtaken by DATA (the network reordered the server's
             * OACK re-send): nothing to answer. */
            s->res->duplicate_data++;
            return;
        }
        fail(s, c, TB_R_PROTOCOL);
        return;
    }
    const char *p = (const char *)b + 2, *end = (const char *)b + n;
    if (n > 2 && end[-1] != 0) {
        fail(s, c, TB_R_BAD_OACK);
        return;
    }
    uint32_t blksize = 512, window = 1;
    int got_tsize = 0;
    while (p < end) {
        const char *k = p;
        const char *ke = memchr(p, 0, (size_t)(end - p));
        if (!ke || ke + 1 >= end) {
            fail(s, c, TB_R_BAD_OACK);
            return;
        }
        const char *v = ke + 1;
        const char *ve = memchr(v, 0, (size_t)(end - v));
        if (!ve) {
            fail(s, c, TB_R_BAD_OACK);
            return;
        }
        p = ve + 1;
        uint64_t val;
        if (parse_uint(v, ve, &val) < 0) {
            fail(s, c, TB_R_BAD_OACK);
            return;
        }
        size_t kl = (size_t)(ke - k);
        if (kl == 7 && strncasecmp(k, "blksize", 7) == 0 && (st->ask & TB_ASK_BLKSIZE)) {
            if (val > st->ask_blksize || val < 8) {
                fail(s, c, TB_R_BAD_OACK);
                return;
            }
            blksize = (uint32_t)val;
        } else if (kl == 10 && strncasecmp(k, "windowsize", 10) == 0 &&
                   (st->ask & TB_ASK_WINDOW)) {
            if (val > st->ask_window || val < 1) {
                fail(s, c, TB_R_BAD_OACK);
                return;
            }
            window = (uint32_t)val;
        } else if (kl == 5 && strncasecmp(k, "tsize", 5) == 0 && (st->ask & TB_ASK_TSIZE)) {
            got_tsize = 1;
            if (st->expect != TB_NOTFOUND && !st->known && c->size == TB_SIZE_UNKNOWN) {
                c->size = val; /* the bytes are unknown: hold the server to its word */
                *announced(s, c, c->step) = val;
            } else if (st->expect != TB_NOTFOUND && val != c->size) {
                fail(s, c, TB_R_BAD_TSIZE);
                return;
            }
        } else if (kl == 7 && strncasecmp(k, "timeout", 7) == 0 &&
                   (st->ask & TB_ASK_TIMEOUT)) {
            if (val != st->ask_timeout) {
                fail(s, c, TB_R_BAD_OACK);
                return;
            }
        } else {
            fail(s, c, TB_R_BAD_OACK); /* an option the client did not ask for */
            return;
        }
    }
    if (st->expect == TB_NOTFOUND) {
        fail(s, c, TB_R_FOUND);
        return;
    }
    if (st->expect == TB_PROBE) {
        if (!got_tsize) {
            fail(s, c, TB_R_NO_TSIZE);
            return;
        }
        send_err(s, c, 8, "probe done", &c->tid);
        step_done(s, c, now);
        return;
    }
    c->blksize = blksize;
    c->window = window;
    c->state = S_WAIT_OACK_DONE;
    c->acked = 0;
    send_ack(s, c, 0);
    c->retries = 0;
    c->deadline = now + s->cfg->ack_timeout;
}

static void on_data(struct storm *s, struct client *c, const unsigned char *b, size_t n,
                    double now)
{
    const struct tb_step *st = &s->steps[c->step];
    if (c->state == S_WAIT_FIRST) {
        if (st->expect == TB_PROBE) {
            fail(s, c, TB_R_NO_OACK);
            return;
        }
        if (st->expect == TB_NOTFOUND) {
            fail(s, c, TB_R_FOUND);
            return;
        }
        c->state = S_DATA;
    } else if (c->state == S_WAIT_OACK_DONE) {
        c->state = S_DATA;
    }
    unsigned blk = (unsigned)(b[2] << 8 | b[3]);
    unsigned want = (unsigned)(c->nblk & 0xFFFF);
    if (blk != want) {
        unsigned diff = (blk - want) & 0xFFFF;
        if (diff < 0x8000) {
            if (!c->gap_acked) {
                c->gap_acked = 1;
                c->inwin = 0;
                c->acked = (int)((c->nblk - 1) & 0xFFFF);
                send_ack(s, c, (unsigned)c->acked);
            }
        } else {
            s->res->duplicate_data++;
            if ((int)blk == c->acked)
                send_ack(s, c, blk);
        }
        return;
    }
    size_t plen = n - 4;
    uint64_t bs = c->blksize;
    if (plen > bs) {
        fail(s, c, TB_R_OVERSIZE);
        return;
    }
    uint64_t off = (c->nblk - 1) * bs;
    if (off + plen > c->size) { /* never, for TB_SIZE_UNKNOWN */
        fail(s, c, TB_R_LONG_FILE);
        return;
    }
    if (st->known && memcmp(st->data + off, b + 4, plen) != 0) {
        fail(s, c, TB_R_CORRUPT);
        return;
    }
    s->res->bytes_ok += plen;
    c->gap_acked = 0;
    c->retries = 0;
    c->deadline = now + s->cfg->ack_timeout;
    c->nblk++;
    if (plen < bs) {
        if (c->size != TB_SIZE_UNKNOWN && off + plen != c->size) {
            fail(s, c, TB_R_SHORT_FILE);
            return;
        }
        send_ack(s, c, blk);
        step_done(s, c, now);
        return;
    }
    if (++c->inwin >= c->window) {
        c->inwin = 0;
        c->acked = (int)blk;
        send_ack(s, c, blk);
    }
}

void tb_on_packet(struct storm *s, struct client *c, const unsigned char *b, size_t n,
                  const struct sockaddr_in *from, double now)
{
    if (!c->has_tid || from->sin_port != c->tid.sin_port ||
        from->sin_addr.s_addr != c->tid.sin_addr.s_addr) {
        if (!c->has_tid && from->sin_addr.s_addr == s->server.sin_addr.s_addr &&
            from->sin_port != s->server.sin_port) {
            c->tid = *from;
            c->has_tid = 1;
            if (s->res->first_answers < s->cfg->fa_cap)
                s->fa[s->res->first_answers] = now - c->t_req;
            s->res->first_answers++;
        } else {
            c->wrong_tid++;
            s->res->wrong_tid_packets++;
            send_err(s, c, 5, "unknown transfer ID", from);
            return;
        }
    }
    if (n < 4) {
        fail(s, c, TB_R_SHORT_PACKET);
        return;
    }
    unsigned op = (unsigned)(b[0] << 8 | b[1]);
    if (op == 3) {
        on_data(s, c, b, n, now);
    } else if (op == 6) {
        on_oack(s, c, b, n, now);
    } else if (op == 5) {
        unsigned code = (unsigned)(b[2] << 8 | b[3]);
        c->has_tid = 0;
        if (c->state == S_WAIT_FIRST && s->steps[c->step].expect == TB_NOTFOUND && code == 1)
            step_done(s, c, now);
        else
            fail(s, c, TB_R_ERROR_BASE + (int)(code > 99 ? 99 : code));
    } else {
        fail(s, c, TB_R_PROTOCOL);
    }
}

static void storm_free(struct storm *s)
{
    free(s->heap);
    free(s->announced);
    free(s->running);
    free(s->c);
    if (s->ep >= 0)
        close(s->ep);
}

static int storm_init(struct storm *s, const struct tb_config *cfg,
                      const struct tb_step *steps, struct tb_result *res,
                      struct tb_client_out *out, double *first_answers)
{
    memset(s, 0, sizeof *s);
    s->cfg = cfg;
    s->steps = steps;
    s->res = res;
    s->out = out;
    s->fa = first_answers;
    s->server.sin_family = AF_INET;
    s->server.sin_addr.s_addr = cfg->server_ip;
    s->server.sin_port = cfg->server_port;
    s->next_port = PORT_LO + ((unsigned)getpid() * 7919u) % (PORT_HI - PORT_LO);
    s->faults = cfg->f_loss > 0 || cfg->f_dup > 0 || cfg->f_reorder > 0;
    s->rng = cfg->f_seed;
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    s->c = calloc((size_t)cfg->nclients, sizeof *s->c);
    s->running = calloc((size_t)cfg->nclients, sizeof *s->running);
    s->announced = malloc((size_t)cfg->nclients * (size_t)cfg->nsteps * sizeof *s->announced);
    if (s->faults && cfg->f_reorder > 0 && cfg->f_max_held > 0)
        s->heap = calloc(cfg->f_max_held, sizeof *s->heap);
    if (s->ep < 0 || !s->c || !s->running || !s->announced ||
        (s->faults && cfg->f_reorder > 0 && cfg->f_max_held > 0 && !s->heap)) {
        storm_free(s);
        return -1;
    }
    for (size_t i = 0; i < (size_t)cfg->nclients * (size_t)cfg->nsteps; i++)
        s->announced[i] = TB_SIZE_UNKNOWN;
    for (int i = 0; i < cfg->nclients; i++) {
        s->c[i].fd = -1;
        out[i].reason = 0;
        out[i].completion = -1;
    }
    return 0;
}

/* Time out the running clients that are due; drop the finished from the list. */
static void scan_timers(struct storm *s, double now)
{
    int k = 0;
    for (int i = 0; i < s->nrunning; i++) {
        struct client *c = &s->c[s->running[i]];
        if (c->state == S_DONE || c->state == S_FAILED)
            continue;
        if (c->deadline <= now) {
            on_timeout(s, c, now);
            if (c->state == S_DONE || c->state == S_FAILED)
                continue;
        }
        s->running[k++] = s->running[i];
    }
    s->nrunning = k;
}

/* Read what the ready sockets hold (at most 64 datagrams a socket a round). */
static void receive(struct storm *s, const struct epoll_event *evs, int ne, double now)
{
    static unsigned char buf[65536 + 4];
    for (int e = 0; e < ne; e++) {
        struct client *c = &s->c[evs[e].data.u32];
        int fd = c->fd;
        for (int k = 0; k < 64 && fd >= 0 && c->fd == fd; k++) {
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            ssize_t r = recvfrom(fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from,
                                 &fl);
            if (r < 0)
                break;
            tb_deliver(s, c, buf, (size_t)r, &from, now);
        }
    }
}

int tb_run(const struct tb_config *cfg, const struct tb_step *steps, struct tb_result *res,
           struct tb_client_out *out, double *first_answers)
{
    struct storm s;
    if (storm_init(&s, cfg, steps, res, out, first_answers) < 0)
        return -1;
    int n = cfg->nclients;
    struct epoll_event evs[1024];
    double t0 = mono();
    double hard_end = t0 + cfg->deadline;
    int next_start = 0;
    double next_scan = t0;
    for (;;) {
        double now = mono();
        if (now >= hard_end) {
            res->deadline_hit = 1;
            break;
        }
        while (next_start < n &&
               (cfg->ramp <= 0 || t0 + cfg->ramp * next_start / n <= now)) {
            struct client *c = &s.c[next_start];
            s.running[s.nrunning++] = next_start++;
            c->started = now;
            c->loop_end = now + cfg->repeat_seconds;
            c->step = 0;
            start_step(&s, c, now);
        }
        tb_release_due(&s, now);
        if (now >= next_scan) {
            scan_timers(&s, now);
            next_scan = now + 0.01;
            if (!s.nrunning && next_start >= n)
                break;
        }
        double wait = next_scan - now;
        if (next_start < n && cfg->ramp > 0) {
            double ns = t0 + cfg->ramp * next_start / n - now;
            if (ns < wait)
                wait = ns;
        }
        if (s.nheld && s.heap[0].due - now < wait)
            wait = s.heap[0].due - now;
        int ms = wait > 0 ? (int)(wait * 1000) + 1 : 0; /* round up: never spin */
        int ne = epoll_wait(s.ep, evs, 1024, ms);
        if (ne > 0)
            receive(&s, evs, ne, mono());
    }
    res->wall = mono() - t0;
    for (int i = 0; i < n; i++) {
        struct client *c = &s.c[i];
        if (c->state != S_DONE && c->state != S_FAILED)
            fail(&s, c, c->state == S_IDLE ? TB_R_NOT_STARTED : TB_R_DEADLINE);
    }
    tb_drop_held(&s);
    storm_free(&s);
    return 0;
}
