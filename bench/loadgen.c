/* The load generator of bench/run.py and bench/fanout.py: one epoll loop,
 * non-blocking sockets, requests and masked frames built once.
 *
 *   loadgen MODE PORT CONNECTIONS SECONDS SERVER_PID [--resume]
 *
 * prints one JSON line with the CPU share of the load generator and of the
 * server (from /proc/SERVER_PID/stat) over the measured time.
 * MODE: http (one request in flight per connection), ws (a window of 32
 * round trips in flight per connection), broadcast (SECONDS is the number of
 * rounds; beside p50 and p90 it gives p99, the CPU seconds of both sides
 * and the rounds), idle (opens the connections, prints "open", waits for
 * stdin to close). With --resume every page connection opens with &last=0
 * (docs/delivery.md "Delivery across reconnects"), reads the hello first and,
 * as the browser client does, acknowledges numbered pushes every 32 frames or
 * 5 s after the first it has not acknowledged.
 *
 * Connection i comes from 127.0.0.(1 + i / 10000): no (source, destination)
 * pair runs out of ephemeral ports. The server's frames are parsed by their
 * headers (RFC 6455 section 5.2), pings are answered with pongs, and every
 * WebSocket ends with a closing handshake.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BODY "{\"kind\": \"rpc\", \"id\": 1, \"msg\": {\"type\": \"Echo\", \"fields\": {\"text\": \"hello\"}}}"
#define SHOUT "{\"kind\":\"send\",\"msg\":{\"type\":\"Shout\",\"fields\":{\"text\":\"x\"}}}"
#define WINDOW 32         /* ws: round trips in flight per connection */
#define BATCH 250         /* connections opened at a time */
#define PER_SOURCE 10000  /* connections per source address */
#define ACK_EVERY 32      /* the browser client's (docs/delivery.md) */
#define ACK_AFTER_S 5.0
#define READ_BYTES (256 * 1024)

enum mode { HTTP, WS, BROADCAST, IDLE };
enum state { CONNECTING, HANDSHAKE, OPEN, CLOSING, CLOSED };

struct conn {
    int fd;
    enum state state;
    unsigned char *in;  /* bytes read but not yet a whole response or frame */
    size_t inlen, incap;
    unsigned char *out; /* bytes the socket did not take yet */
    size_t outlen, outcap;
    long long seq, acked;            /* resume: last seq received, last acknowledged */
    double ack_due;                  /* 0: no ack timer */
    struct conn *ack_prev, *ack_next; /* the ack timers, by due time */
};

static int mode, resume, epfd, nconns, port, server_pid;
static struct conn *conns;
static unsigned char rbuf[READ_BYTES];
static long long done, pushes, acks, opened, closed;
static struct conn *timers_head, *timers_tail;
static char request[512], upgrade[512];
static unsigned char rpc_frame[256], shout_frame[256];
static size_t request_len, upgrade_len, rpc_len, shout_len;
static unsigned char *window_bytes; /* WINDOW rpc frames back to back */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* utime + stime of the server, fields 14 and 15 of /proc/PID/stat (counted
 * after the command name's closing parenthesis, which may contain spaces). */
static double server_cpu(void) {
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", server_pid);
    FILE *f = fopen(path, "r");
    if (!f) die("cannot read %s: %s", path, strerror(errno));
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *p = strrchr(text, ')');
    unsigned long long utime, stime;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
        die("cannot parse %s", path);
    return (double)(utime + stime) / sysconf(_SC_CLK_TCK);
}

/* Masking keys: xorshift32, seeded once from getrandom(). */
static uint32_t next_key(void) {
    static uint32_t x;
    while (!x && getrandom(&x, sizeof x, 0) != sizeof x) die("getrandom: %s", strerror(errno));
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return x;
}

/* A client frame: FIN + text (or another opcode), the mask bit and the
 * length (payloads here are under 64 KiB), a 4-byte key, and the payload
 * XORed with it (RFC 6455 5.3). */
static size_t masked(unsigned char *dst, int opcode, const void *payload, size_t n) {
    size_t h = 0;
    dst[h++] = 0x80 | opcode;
    if (n < 126) {
        dst[h++] = 0x80 | n;
    } else {
        dst[h++] = 0x80 | 126;
        dst[h++] = n >> 8;
        dst[h++] = n & 0xff;
    }
    uint32_t k = next_key();
    unsigned char *key = dst + h;
    memcpy(key, &k, 4);
    for (size_t i = 0; i < n; i++) dst[h + 4 + i] = ((const unsigned char *)payload)[i] ^ key[i % 4];
    return h + 4 + n;
}

static void append(unsigned char **buf, size_t *len, size_t *cap, const void *p, size_t n) {
    if (*len + n > *cap) {
        *cap = (*len + n) * 2;
        *buf = realloc(*buf, *cap);
        if (!*buf) die("out of memory");
    }
    memcpy(*buf + *len, p, n);
    *len += n;
}

static void watch(struct conn *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

/* While closing, the server may have closed first: the read that follows
 * sees it. */
static void send_failed(struct conn *c) {
    if (c->state != CLOSING) die("send: %s", strerror(errno));
    c->outlen = 0;
    watch(c, EPOLL_CTL_MOD, EPOLLIN);
}

/* Writes what the socket takes now; the rest waits for EPOLLOUT. */
static void send_bytes(struct conn *c, const void *p, size_t n) {
    if (c->outlen == 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN) {
            send_failed(c);
            return;
        }
        if (w < 0) w = 0;
        p = (const unsigned char *)p + w;
        n -= w;
        if (n == 0) return;
        watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
    }
    append(&c->out, &c->outlen, &c->outcap, p, n);
}

static void flush(struct conn *c) {
    ssize_t w = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN) {
        send_failed(c);
        return;
    }
    if (w <= 0) return;
    memmove(c->out, c->out + w, c->outlen - w);
    c->outlen -= w;
    if (c->outlen == 0) watch(c, EPOLL_CTL_MOD, EPOLLIN);
}

/* Ack timers: each is due ACK_AFTER_S after it starts, so appending keeps
 * the list in order of due time. */
static void timer_stop(struct conn *c) {
    if (!c->ack_due) return;
    *(c->ack_prev ? &c->ack_prev->ack_next : &timers_head) = c->ack_next;
    *(c->ack_next ? &c->ack_next->ack_prev : &timers_tail) = c->ack_prev;
    c->ack_prev = c->ack_next = NULL;
    c->ack_due = 0;
}

static void timer_start(struct conn *c) {
    c->ack_due = now() + ACK_AFTER_S;
    c->ack_prev = timers_tail;
    *(timers_tail ? &timers_tail->ack_next : &timers_head) = c;
    timers_tail = c;
}

/* {"kind":"ack","seq":n}, exactly as the browser client writes it. */
static void ack(struct conn *c) {
    timer_stop(c);
    if (c->seq <= c->acked || c->state != OPEN) return;
    char text[64];
    unsigned char frame[80];
    int n = snprintf(text, sizeof text, "{\"kind\":\"ack\",\"seq\":%lld}", c->seq);
    c->acked = c->seq;
    send_bytes(c, frame, masked(frame, 1, text, n));
    acks++;
}

/* A numbered push starts {"seq":n, (docs/protocol.md); the browser client
 * acks at once when 32 or more are unacknowledged, else starts a 5 s timer
 * unless one runs. */
static void numbered(struct conn *c, const unsigned char *payload, uint64_t n) {
    static const char prefix[] = "{\"seq\":";
    size_t at = sizeof prefix - 1;
    if (n <= at || memcmp(payload, prefix, at))
        die("a push without seq: %.*s", (int)(n < 60 ? n : 60), payload);
    long long seq = 0;
    while (at < n && payload[at] >= '0' && payload[at] <= '9') seq = seq * 10 + (payload[at++] - '0');
    if (seq <= c->seq) return; /* had it already */
    c->seq = seq;
    if (c->seq - c->acked >= ACK_EVERY)
        ack(c);
    else if (!c->ack_due)
        timer_start(c);
}

/* One server frame at p (n bytes available): byte 0 is FIN and the opcode,
 * byte 1 the mask bit and a 7-bit length; 126 means a 16-bit length follows,
 * 127 a 64-bit one (RFC 6455 5.2). A server never masks. Returns the frame's
 * size, 0 if it is not all there yet; *head is the header's size. */
static uint64_t frame_size(const unsigned char *p, size_t n, size_t *head) {
    if (n < 2) return 0;
    if (p[1] & 0x80) die("a masked frame from the server");
    uint64_t len = p[1] & 0x7f;
    *head = 2;
    if (len == 126) {
        if (n < 4) return 0;
        len = (uint64_t)p[2] << 8 | p[3];
        *head = 4;
    } else if (len == 127) {
        if (n < 10) return 0;
        len = 0;
        for (int i = 2; i < 10; i++) len = len << 8 | p[i];
        *head = 10;
    }
    return n - *head < len ? 0 : *head + len;
}

static void finish(struct conn *c) {
    timer_stop(c);
    close(c->fd); /* also leaves the epoll set */
    c->state = CLOSED;
    closed++;
}

/* Handles every whole frame in p; returns the bytes used. */
static size_t frames(struct conn *c, const unsigned char *p, size_t n) {
    size_t at = 0, head;
    uint64_t size;
    long long replies = 0;
    while ((size = frame_size(p + at, n - at, &head)) > 0) {
        const unsigned char *payload = p + at + head;
        uint64_t len = size - head;
        int opcode = p[at] & 0x0f, fin = p[at] & 0x80;
        at += size;
        if (opcode == 0x8) { /* close: the answer to ours, or the server ending the connection */
            if (c->state != CLOSING)
                die("the server closed a connection (code %d)", len >= 2 ? payload[0] << 8 | payload[1] : 0);
            finish(c);
            return at;
        } else if (opcode == 0x9 && c->state == OPEN) { /* ping: a pong with the same payload */
            unsigned char pong[140];
            if (len > 125) die("a ping of %llu bytes", (unsigned long long)len);
            send_bytes(c, pong, masked(pong, 0xA, payload, len));
        } else if (opcode == 0x9 || opcode == 0xA) {
            continue;
        } else if (!fin) {
            die("a fragmented message (this load never causes one)");
        } else if (mode == WS) {
            replies++;
        } else {
            pushes++;
            if (resume) numbered(c, payload, len);
        }
    }
    done += replies;
    /* every reply frees a place in the window: fill it again, in one write */
    while (replies > 0 && c->state == OPEN) {
        long long k = replies < WINDOW ? replies : WINDOW;
        send_bytes(c, window_bytes, k * rpc_len);
        replies -= k;
    }
    return at;
}

static const unsigned char *find(const unsigned char *p, size_t n, const char *s) {
    return memmem(p, n, s, strlen(s));
}

/* Handles every whole HTTP response in p; returns the bytes used. */
static size_t responses(struct conn *c, const unsigned char *p, size_t n) {
    size_t at = 0;
    for (;;) {
        const unsigned char *end = find(p + at, n - at, "\r\n\r\n");
        if (!end) return at;
        size_t head = end + 4 - (p + at);
        if (memcmp(p + at, "HTTP/1.1 200", 12)) die("not a 200: %.*s", (int)head, p + at);
        const unsigned char *cl = NULL;
        for (const unsigned char *q = p + at; q + 16 < end; q++)
            if (q[0] == '\n' && !strncasecmp((const char *)q + 1, "content-length:", 15)) cl = q + 16;
        if (!cl) die("a response without content-length");
        size_t length = strtoul((const char *)cl, NULL, 10);
        if (n - at < head + length) return at;
        at += head + length;
        done++;
        send_bytes(c, request, request_len);
    }
}

/* The 101 and, with --resume, the hello that comes first; returns the bytes
 * used, 0 while they are not all there. */
static size_t handshake(struct conn *c, const unsigned char *p, size_t n) {
    const unsigned char *end = find(p, n, "\r\n\r\n");
    if (!end) return 0;
    size_t at = end + 4 - p, head;
    if (memcmp(p, "HTTP/1.1 101", 12)) die("the upgrade was refused: %.*s", (int)at, p);
    if (resume) {
        uint64_t size = frame_size(p + at, n - at, &head);
        if (!size) return 0;
        static const char hello[] = "{\"kind\":\"hello\"";
        if (size - head < sizeof hello - 1 || memcmp(p + at + head, hello, sizeof hello - 1))
            die("no hello: %.*s", (int)(size - head), p + at + head);
        at += size;
    }
    c->state = OPEN;
    opened++;
    if (mode == WS) send_bytes(c, window_bytes, WINDOW * rpc_len);
    return at;
}

static size_t consume(struct conn *c, const unsigned char *p, size_t n) {
    size_t at = 0;
    if (mode == HTTP) return responses(c, p, n);
    if (c->state == HANDSHAKE) {
        at = handshake(c, p, n);
        if (c->state != OPEN) return 0;
    }
    return at + frames(c, p + at, n - at);
}

static void readable(struct conn *c) {
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0 && c->state == CLOSING) {
        finish(c);
        return;
    }
    if (r < 0) die("read: %s", strerror(errno));
    if (r == 0) die("the server closed a connection");
    if (c->inlen == 0) { /* the usual case: nothing left over, no copy */
        size_t used = consume(c, rbuf, r);
        if (used < (size_t)r) append(&c->in, &c->inlen, &c->incap, rbuf + used, r - used);
    } else {
        append(&c->in, &c->inlen, &c->incap, rbuf, r);
        size_t used = consume(c, c->in, c->inlen);
        memmove(c->in, c->in + used, c->inlen - used);
        c->inlen -= used;
    }
}

static void connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) die("connect: %s", strerror(err));
    watch(c, EPOLL_CTL_MOD, EPOLLIN);
    if (mode == HTTP) {
        c->state = OPEN;
        opened++;
        send_bytes(c, request, request_len);
    } else {
        c->state = HANDSHAKE;
        send_bytes(c, upgrade, upgrade_len);
    }
}

/* Runs the loop until *until reaches target (returns 1) or the deadline
 * passes (returns 0). A NULL connection in an event is stdin (idle mode):
 * returns 1 when it closes. */
static int run(double deadline, const long long *until, long long target) {
    struct epoll_event evs[1024];
    for (;;) {
        double t = now();
        while (timers_head && timers_head->ack_due <= t) ack(timers_head);
        if (until && *until >= target) return 1;
        if (t >= deadline) return 0;
        double wake = timers_head && timers_head->ack_due < deadline ? timers_head->ack_due : deadline;
        double ms = (wake - t) * 1000 + 1;
        int n = epoll_wait(epfd, evs, 1024, ms < 1000 ? (int)ms : 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                if (read(0, rbuf, sizeof rbuf) <= 0) return 1;
                continue;
            }
            if (c->state == CLOSED) continue; /* closed by an earlier event of this batch */
            if (c->state == CONNECTING) { /* the only event it waits for: connect() ended */
                connected(c);
                continue;
            }
            if (evs[i].events & EPOLLOUT) flush(c);
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c);
        }
    }
}

static void open_all(void) {
    for (int start = 0; start < nconns; start += BATCH) {
        int end = start + BATCH < nconns ? start + BATCH : nconns;
        for (int i = start; i < end; i++) {
            struct conn *c = &conns[i];
            int one = 1;
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (c->fd < 0) die("socket: %s (connection %d)", strerror(errno), i);
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            /* The source port is chosen at connect(), for the whole 4-tuple. */
            setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001 + i / PER_SOURCE)};
            if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind: %s", strerror(errno));
            struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port),
                                      .sin_addr.s_addr = htonl(0x7f000001)};
            if (connect(c->fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS)
                die("connect: %s (connection %d)", strerror(errno), i);
            c->state = CONNECTING;
            watch(c, EPOLL_CTL_ADD, EPOLLOUT);
        }
        if (!run(now() + 30, &opened, end)) die("%lld of %d connections opened in 30 s", opened, nconns);
    }
}

/* Ends every page with a closing handshake, as a closing browser tab does:
 * a connection lost without one keeps its page held for resume_window
 * (docs/delivery.md "Lost, held") and would weigh on the next measure. */
static void close_all(void) {
    static const unsigned char normal[2] = {0x03, 0xe8}; /* 1000 */
    unsigned char frame[16];
    long long closing = 0;
    for (int i = 0; i < nconns; i++) {
        if (conns[i].state != OPEN) continue;
        send_bytes(&conns[i], frame, masked(frame, 0x8, normal, 2));
        conns[i].state = CLOSING;
        closing++;
    }
    if (!run(now() + 10, &closed, closing))
        fprintf(stderr, "loadgen: %lld of %lld closing handshakes ended in 10 s\n", closed, closing);
}

static void raise_nofile(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t need = nconns + 64;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need) {
        struct rlimit want = {need, need};
        if (setrlimit(RLIMIT_NOFILE, &want) < 0)
            die("%d connections need %lu descriptors; RLIMIT_NOFILE's hard limit is %lu and cannot be raised "
                "(%s: needs root with CAP_SYS_RESOURCE, up to /proc/sys/fs/nr_open)",
                nconns, (unsigned long)need, (unsigned long)rl.rlim_max, strerror(errno));
        return;
    }
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

static void build(void) {
    request_len = snprintf(request, sizeof request,
                           "POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                           "content-length: %zu\r\n\r\n%s",
                           strlen(BODY), BODY);
    upgrade_len = snprintf(upgrade, sizeof upgrade,
                           "GET /_rally/ws?page=/%s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n"
                           "connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           "sec-websocket-version: 13\r\n\r\n",
                           resume ? "&last=0" : "");
    rpc_len = masked(rpc_frame, 1, BODY, strlen(BODY));
    shout_len = masked(shout_frame, 1, SHOUT, strlen(SHOUT));
    window_bytes = malloc(WINDOW * rpc_len);
    if (!window_bytes) die("out of memory");
    for (int i = 0; i < WINDOW; i++) memcpy(window_bytes + i * rpc_len, rpc_frame, rpc_len);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 6 || argc > 7 || (argc == 7 && strcmp(argv[6], "--resume")))
        die("usage: loadgen http|ws|broadcast|idle PORT CONNECTIONS SECONDS SERVER_PID [--resume]");
    const char *names[] = {"http", "ws", "broadcast", "idle"};
    mode = -1;
    for (int i = 0; i < 4; i++)
        if (!strcmp(argv[1], names[i])) mode = i;
    if (mode < 0) die("unknown mode %s", argv[1]);
    port = atoi(argv[2]);
    nconns = atoi(argv[3]);
    double seconds = atof(argv[4]);
    server_pid = atoi(argv[5]);
    resume = argc == 7;
    if (nconns < 1) die("CONNECTIONS must be at least 1");
    raise_nofile();
    build();
    conns = calloc(nconns, sizeof *conns);
    epfd = epoll_create1(0);
    if (!conns || epfd < 0) die("cannot start: %s", strerror(errno));

    open_all();
    char result[512];
    if (mode == HTTP || mode == WS) {
        run(now() + 1.0, NULL, 0); /* warm-up */
        long long d0 = done;
        double c0 = cpu(), s0 = server_cpu(), t0 = now();
        run(t0 + seconds, NULL, 0);
        double wall = now() - t0;
        snprintf(result, sizeof result, "{\"rate\": %.1f, \"loadgen_cpu\": %.4f, \"server_cpu\": %.4f}",
                 (done - d0) / wall, (cpu() - c0) / wall, (server_cpu() - s0) / wall);
    } else if (mode == IDLE) {
        puts("open");
        fflush(stdout);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl(stdin): %s", strerror(errno));
        run(now() + 1e9, NULL, 0);
        snprintf(result, sizeof result, "{\"open\": %d}", nconns);
    } else {
        /* broadcast: a round is one Shout from connection 0, until every
         * connection has one more push; 50 ms between rounds */
        int rounds = (int)seconds;
        if (rounds < 1) die("broadcast needs at least one round");
        double *lat = malloc(rounds * sizeof *lat);
        if (!lat) die("out of memory");
        double c0 = cpu(), s0 = server_cpu(), w0 = now();
        for (int r = 0; r < rounds; r++) {
            long long target = pushes + nconns;
            double t0 = now();
            send_bytes(&conns[0], shout_frame, shout_len);
            if (!run(t0 + 30, &pushes, target))
                die("round %d: %lld of %d pushes in 30 s", r, pushes - target + nconns, nconns);
            lat[r] = now() - t0;
            run(now() + 0.05, NULL, 0);
        }
        double wall = now() - w0, gen = cpu() - c0, srv = server_cpu() - s0;
        qsort(lat, rounds, sizeof *lat, by_value);
        double p50 = lat[rounds / 2], p99 = lat[(rounds * 99 + 99) / 100 - 1]; /* nearest rank */
        snprintf(result, sizeof result,
                 "{\"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, \"deliveries_per_s\": %.1f, "
                 "\"loadgen_cpu\": %.4f, \"server_cpu\": %.4f, \"loadgen_cpu_s\": %.4f, \"server_cpu_s\": %.4f, "
                 "\"rounds\": %d, \"acks\": %lld}",
                 p50 * 1000, lat[(int)(rounds * 0.9)] * 1000, p99 * 1000, nconns / p50,
                 gen / wall, srv / wall, gen, srv, rounds, acks);
        free(lat);
    }
    if (mode != HTTP) close_all();
    puts(result);
    return 0;
}
