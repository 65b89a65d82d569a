/*
 * The storm's fault layer: loss, duplication and reordering of the generator's own
 * datagrams, both ways (bench/README.md, Faults). Seeded: the same seed gives the same
 * choices for the same traffic. Without faults it passes every datagram straight on.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "_cgen_int.h"

static double rnd(struct storm *s) /* splitmix64: seeded, the same run for the same seed */
{
    uint64_t z = (s->rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

static int chance(struct storm *s, double p)
{
    return p > 0 && rnd(s) < p;
}

static void heap_swap(struct held *a, struct held *b)
{
    struct held t = *a;
    *a = *b;
    *b = t;
}

/* Hold a copy of a datagram for later; 0 when the heap is full (the caller sends now). */
static int hold(struct storm *s, struct client *c, int dir, const void *buf, size_t len,
                const struct sockaddr_in *addr)
{
    const struct tb_config *cfg = s->cfg;
    if (s->nheld >= cfg->f_max_held)
        return 0;
    unsigned char *copy = malloc(len ? len : 1);
    if (!copy)
        return 0;
    memcpy(copy, buf, len);
    struct held h = {
        .due = mono() + cfg->f_hold_min + (cfg->f_hold_max - cfg->f_hold_min) * rnd(s),
        .client = (uint32_t)(c - s->c), .gen = c->gen, .dir = dir,
        .seq = dir ? c->nin : c->nout, .addr = *addr, .len = (uint32_t)len, .buf = copy,
    };
    uint32_t i = s->nheld++;
    s->heap[i] = h;
    while (i > 0 && s->heap[(i - 1) / 2].due > s->heap[i].due) {
        heap_swap(&s->heap[(i - 1) / 2], &s->heap[i]);
        i = (i - 1) / 2;
    }
    s->res->f_held[dir]++;
    if (s->nheld > s->res->f_held_peak)
        s->res->f_held_peak = s->nheld;
    return 1;
}

static struct held heap_pop(struct storm *s)
{
    struct held top = s->heap[0];
    s->heap[0] = s->heap[--s->nheld];
    uint32_t i = 0;
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < s->nheld && s->heap[l].due < s->heap[m].due)
            m = l;
        if (r < s->nheld && s->heap[r].due < s->heap[m].due)
            m = r;
        if (m == i)
            break;
        heap_swap(&s->heap[i], &s->heap[m]);
        i = m;
    }
    return top;
}

/* Every datagram a client sends goes through here. */
ssize_t tb_send(struct storm *s, struct client *c, const void *buf, size_t len,
                const struct sockaddr_in *to)
{
    if (!s->faults)
        return sendto(c->fd, buf, len, MSG_DONTWAIT, (const struct sockaddr *)to, sizeof *to);
    const struct tb_config *cfg = s->cfg;
    struct tb_result *res = s->res;
    res->f_seen[0]++;
    if (chance(s, cfg->f_loss)) {
        res->f_dropped[0]++;
        return (ssize_t)len;
    }
    int copies = 1;
    if (chance(s, cfg->f_dup)) {
        copies = 2;
        res->f_duplicated[0]++;
    }
    ssize_t r = (ssize_t)len;
    for (int i = 0; i < copies; i++) {
        if (chance(s, cfg->f_reorder) && hold(s, c, 0, buf, len, to))
            continue;
        c->nout++;
        ssize_t k = sendto(c->fd, buf, len, MSG_DONTWAIT, (const struct sockaddr *)to,
                           sizeof *to);
        if (k < 0)
            r = k;
    }
    return r;
}

/* Every datagram a client receives goes through here. */
void tb_deliver(struct storm *s, struct client *c, const unsigned char *b, size_t n,
                const struct sockaddr_in *from, double now)
{
    if (!s->faults) {
        tb_on_packet(s, c, b, n, from, now);
        return;
    }
    const struct tb_config *cfg = s->cfg;
    struct tb_result *res = s->res;
    res->f_seen[1]++;
    if (chance(s, cfg->f_loss)) {
        res->f_dropped[1]++;
        return;
    }
    int copies = 1;
    if (chance(s, cfg->f_dup)) {
        copies = 2;
        res->f_duplicated[1]++;
    }
    uint32_t gen = c->gen;
    for (int i = 0; i < copies && c->gen == gen && c->fd >= 0; i++) {
        if (chance(s, cfg->f_reorder) && hold(s, c, 1, b, n, from))
            continue;
        c->nin++;
        tb_on_packet(s, c, b, n, from, now);
    }
}

/* Send or deliver the held copies that are due. A copy whose socket has closed since is
 * lost (a real network would deliver it to a closed port). */
void tb_release_due(struct storm *s, double now)
{
    while (s->nheld && s->heap[0].due <= now) {
        struct held h = heap_pop(s);
        struct client *c = &s->c[h.client];
        if (c->gen != h.gen || c->fd < 0) {
            s->res->f_stale[h.dir]++;
        } else if (h.dir == 0) {
            if (c->nout > h.seq)
                s->res->f_overtaken[0]++;
            c->nout++;
            (void)sendto(c->fd, h.buf, h.len, MSG_DONTWAIT, (const struct sockaddr *)&h.addr,
                         sizeof h.addr);
        } else {
            if (c->nin > h.seq)
                s->res->f_overtaken[1]++;
            c->nin++;
            tb_on_packet(s, c, h.buf, h.len, &h.addr, now);
        }
        free(h.buf);
    }
}

/* At the end of a storm: what is still held is never delivered. */
void tb_drop_held(struct storm *s)
{
    while (s->nheld) {
        struct held h = heap_pop(s);
        s->res->f_stale[h.dir]++;
        free(h.buf);
    }
}
