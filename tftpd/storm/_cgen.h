/* Interface of the storm's C core; cffi reads this file as its cdef (ABI mode). */
enum {
    TB_DATA = 0, TB_PROBE = 1, TB_NOTFOUND = 2,
    TB_ASK_BLKSIZE = 1, TB_ASK_TSIZE = 2, TB_ASK_WINDOW = 4, TB_ASK_TIMEOUT = 8
};

enum {
    TB_R_NONE = 0, TB_R_RRQ_TIMEOUT = 1, TB_R_DATA_TIMEOUT = 2, TB_R_WRONG_TID = 3,
    TB_R_CORRUPT = 4, TB_R_SHORT_FILE = 5, TB_R_LONG_FILE = 6, TB_R_OVERSIZE = 7,
    TB_R_BAD_OACK = 8, TB_R_BAD_TSIZE = 9, TB_R_NO_TSIZE = 10, TB_R_NO_OACK = 11,
    TB_R_FOUND = 12, TB_R_PROTOCOL = 13, TB_R_SHORT_PACKET = 14, TB_R_SEND = 15,
    TB_R_SOCKET = 16, TB_R_DEADLINE = 17, TB_R_NOT_STARTED = 18, TB_R_ERROR_BASE = 100
};

struct tb_step {
    const unsigned char *rrq;
    uint32_t rrq_len;
    int expect;
    const unsigned char *data; /* the file's bytes when known (known = 1) */
    uint64_t size;
    int known;                 /* 0: bytes unknown; size comes from the OACK's tsize */
    int ask;
    uint32_t ask_blksize;
    uint32_t ask_window;
    uint32_t ask_timeout;
    int size_from;             /* unknown bytes: the earlier step whose announced tsize
                                  holds here too (workload.size_sources), or -1 */
};

struct tb_config {
    uint32_t server_ip;    /* network byte order */
    uint16_t server_port;  /* network byte order */
    int nclients;
    int nsteps;
    double ramp;
    double deadline;
    double rrq_timeouts[16];
    int n_rrq_timeouts;
    double ack_timeout;
    int ack_retries;
    double repeat_seconds;
    int repeat_max;        /* 0: no repeat */
    uint64_t fa_cap;
    /* Faults the generator injects on its own datagrams, both ways (README: Faults):
     * each datagram is dropped with probability f_loss; else sent (received) twice with
     * probability f_dup; each copy is held back f_hold_min..f_hold_max seconds with
     * probability f_reorder, so later datagrams of the same socket overtake it. */
    double f_loss, f_dup, f_reorder, f_hold_min, f_hold_max;
    uint64_t f_seed;
    uint32_t f_max_held;   /* copies held at once; beyond it a copy goes at once */
};

struct tb_result {
    uint64_t ok;
    uint64_t requests_ok;
    uint64_t requests_failed;
    uint64_t rrq_sent;
    uint64_t rrq_retransmits;
    uint64_t ack_retransmits;
    uint64_t wrong_tid_packets;
    uint64_t duplicate_data;
    uint64_t bytes_ok;
    uint64_t first_answers;
    int deadline_hit;
    double wall;
    /* fault counters: [0] datagrams sent, [1] received */
    uint64_t f_seen[2], f_dropped[2], f_duplicated[2], f_held[2];
    uint64_t f_overtaken[2];  /* held copies released after a later datagram passed */
    uint64_t f_stale[2];      /* held copies whose socket had closed: never delivered */
    uint64_t f_held_peak;
};

struct tb_client_out {
    int reason;
    double completion;
};

int tb_run(const struct tb_config *cfg, const struct tb_step *steps, struct tb_result *res,
           struct tb_client_out *out, double *first_answers);
