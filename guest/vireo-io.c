/*
 * vireo-io: the guest side of `vireo bench blk` and `vireo bench net`.
 * Built static by guest/build.sh into the initramfs as /bin/vireo-io.
 *
 *   vireo-io blk DEV read|write|randread|randwrite BS QD SECONDS
 *       O_DIRECT I/O on DEV for SECONDS (guest clock) with QD requests in
 *       flight (Linux native AIO), BS bytes each; sequential modes wrap at
 *       the end of DEV, random ones pick BS-aligned offsets uniformly.
 *   vireo-io tcp-send IP PORT SECONDS
 *       connect, send for SECONDS, shut down the write side and wait for the
 *       peer to close (so the time covers delivery).
 *   vireo-io tcp-recv IP PORT
 *       connect and read until the peer closes.
 *   vireo-io tcp-connect IP PORT
 *       connect and relay as vsock-connect does (stdin to the socket in
 *       writes of up to 128 KiB, so a file sent this way leaves in frames as
 *       large as the MTU allows whatever the timing; busybox nc writes 1
 *       KiB at a time).
 *   vireo-io vsock-connect CID PORT
 *       connect to a vsock port and relay: stdin to the socket (then shut
 *       its write side), the socket to stdout, until the peer closes. A
 *       reset connection fails with "VIREO-IO-ERROR vsock-connect recv: ..."
 *       (a restored VM's guest sees its transport reset that way).
 *   vireo-io vsock-listen PORT
 *       accept one vsock connection on PORT, then relay as above.
 *       "VSOCK-LISTEN PORT" goes to stderr once it listens.
 *   vireo-io vsock-send CID PORT SECONDS
 *   vireo-io vsock-recv CID PORT
 *       tcp-send and tcp-recv over a vsock connection to CID:PORT (the
 *       guest side of `vireo-bench vsock`).
 *   vireo-io vsock-echo PORT N
 *       accept N connections on PORT and echo each (a process per
 *       connection, all at once) until its peer shuts its write side;
 *       prints "VSOCK-ECHO N" when all are done.
 *
 * Output, one line each, on stdout:
 *   VIREO-IO-BEGIN NAME                     when the measured phase starts
 *   VIREO-IO NAME ops=N bytes=N ns=N        when it ends (guest clock)
 *   VIREO-IO-ERROR NAME message             on failure (exit status 1)
 * NAME is the mode (read, randwrite, tcp-send...). The host times the
 * BEGIN and result lines as they arrive on the console, for a wall-clock
 * figure beside the guest's own.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/vm_sockets.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256
#define NET_BUF (128 * 1024)
/* How long to keep trying to connect (the host may still be setting up). */
#define CONNECT_SECONDS 30

static const char *name = "?";

static void fail(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("VIREO-IO-ERROR %s %s\n", name, msg);
    fflush(stdout);
    exit(1);
}

static void on_alarm(int sig)
{
    (void)sig;
    char msg[160];
    int n = snprintf(msg, sizeof msg, "VIREO-IO-ERROR %s timed out (no progress)\n", name);
    if (n > 0)
        (void)!write(1, msg, (size_t)n);
    _exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        fail("bad %s '%s'", what, s);
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    }
    if (*end)
        fail("bad %s '%s'", what, s);
    return v;
}

static void begin(void)
{
    printf("VIREO-IO-BEGIN %s\n", name);
    fflush(stdout);
}

static void result(uint64_t ops, uint64_t bytes, uint64_t ns)
{
    printf("VIREO-IO %s ops=%llu bytes=%llu ns=%llu\n", name, (unsigned long long)ops,
           (unsigned long long)bytes, (unsigned long long)ns);
    fflush(stdout);
}

/* ---- block ---------------------------------------------------------------- */

static uint64_t rng_state = 0x5649524f494f3031ull;
static uint64_t xorshift(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int blk(int argc, char **argv)
{
    if (argc != 7)
        fail("usage: vireo-io blk DEV read|write|randread|randwrite BS QD SECONDS");
    const char *dev = argv[2];
    name = argv[3];
    int write_mode = !strcmp(name, "write") || !strcmp(name, "randwrite");
    int random = !strcmp(name, "randread") || !strcmp(name, "randwrite");
    if (!write_mode && !random && strcmp(name, "read"))
        fail("unknown mode (read, write, randread, randwrite)");
    uint64_t bs = parse_u64(argv[4], "block size");
    uint64_t qd = parse_u64(argv[5], "queue depth");
    uint64_t secs = parse_u64(argv[6], "seconds");
    if (bs < 512 || bs % 512 || bs > (64 << 20))
        fail("block size %llu: a multiple of 512 up to 64M", (unsigned long long)bs);
    if (qd < 1 || qd > MAX_QD)
        fail("queue depth %llu: 1 to %d", (unsigned long long)qd, MAX_QD);
    if (secs < 1 || secs > 3600)
        fail("seconds %llu: 1 to 3600", (unsigned long long)secs);

    int fd = open(dev, (write_mode ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        fail("open %s: %s", dev, strerror(errno));
    uint64_t size = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        size = (uint64_t)st.st_size;
    else if (ioctl(fd, BLKGETSIZE64, &size) != 0)
        fail("size of %s: %s", dev, strerror(errno));
    uint64_t blocks = size / bs;
    if (blocks < qd)
        fail("%s is too small (%llu bytes) for %llu requests of %llu bytes", dev,
             (unsigned long long)size, (unsigned long long)qd, (unsigned long long)bs);

    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, (unsigned)qd, &ctx) != 0)
        fail("io_setup: %s", strerror(errno));
    static struct iocb cbs[MAX_QD];
    struct iocb *ptrs[MAX_QD];
    struct io_event events[MAX_QD];
    uint64_t next = 0;
    for (uint64_t i = 0; i < qd; i++) {
        void *buf;
        if (posix_memalign(&buf, 4096, bs))
            fail("out of memory");
        memset(buf, write_mode ? 0x5a ^ (int)i : 0, bs);
        memset(&cbs[i], 0, sizeof cbs[i]);
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_lio_opcode = write_mode ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)buf;
        cbs[i].aio_nbytes = bs;
        cbs[i].aio_data = i;
        ptrs[i] = &cbs[i];
    }
#define PLACE(cb)                                                                          \
    do {                                                                                   \
        if (random) {                                                                      \
            (cb)->aio_offset = (int64_t)((xorshift() % blocks) * bs);                      \
        } else {                                                                           \
            (cb)->aio_offset = (int64_t)(next * bs);                                       \
            next = (next + 1) % blocks;                                                    \
        }                                                                                  \
    } while (0)

    signal(SIGALRM, on_alarm);
    alarm((unsigned)secs + 60);
    begin();
    uint64_t start = now_ns(), deadline = start + secs * 1000000000ull, end = start;
    for (uint64_t i = 0; i < qd; i++)
        PLACE(&cbs[i]);
    long n = syscall(SYS_io_submit, ctx, (long)qd, ptrs);
    if (n != (long)qd)
        fail("io_submit: %s", n < 0 ? strerror(errno) : "short submit");
    uint64_t inflight = qd, ops = 0;
    while (inflight) {
        long got = syscall(SYS_io_getevents, ctx, 1L, (long)qd, events, NULL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            fail("io_getevents: %s", strerror(errno));
        }
        end = now_ns();
        long again = 0;
        for (long e = 0; e < got; e++) {
            struct iocb *cb = &cbs[events[e].data];
            if (events[e].res != (int64_t)bs)
                fail("%s at %lld: %s", write_mode ? "write" : "read", (long long)cb->aio_offset,
                     events[e].res < 0 ? strerror((int)-events[e].res) : "short transfer");
            ops++;
            if (end < deadline) {
                PLACE(cb);
                ptrs[again++] = cb;
            } else {
                inflight--;
            }
        }
        if (again && syscall(SYS_io_submit, ctx, again, ptrs) != again)
            fail("io_submit: %s", strerror(errno));
    }
    alarm(0);
    result(ops, ops * bs, end - start);
    return 0;
}

/* ---- TCP ------------------------------------------------------------------ */

/* Connect to IP:PORT, retrying refusals and unreachable routes until
 * CONNECT_SECONDS have passed. */
static int tcp_connect(const char *ip, const char *port_s)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    uint64_t port = parse_u64(port_s, "port");
    if (port < 1 || port > 65535)
        fail("bad port %s", port_s);
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1)
        fail("bad IPv4 address '%s'", ip);
    uint64_t deadline = now_ns() + CONNECT_SECONDS * 1000000000ull;
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (fd < 0)
            fail("socket: %s", strerror(errno));
        int err = 0;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            err = errno;
            if (err == EINPROGRESS) {
                uint64_t now = now_ns();
                int ms = now < deadline ? (int)((deadline - now) / 1000000) : 0;
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                int r = poll(&p, 1, ms);
                socklen_t len = sizeof err;
                if (r == 0)
                    err = ETIMEDOUT;
                else if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
                    err = errno;
            }
        }
        if (!err) {
            int flags = fcntl(fd, F_GETFL);
            fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
            return fd;
        }
        close(fd);
        if (now_ns() >= deadline || err == ETIMEDOUT)
            fail("connect to %s:%s: %s (for %d s)", ip, port_s, strerror(err), CONNECT_SECONDS);
        usleep(200 * 1000);
    }
}

/* Send on a connected stream socket for SECS, shut its write side and wait
 * for the peer to close; prints the figures (tcp-send, vsock-send). */
static int send_for(int fd, uint64_t secs)
{
    static char buf[NET_BUF];
    memset(buf, 0x5a, sizeof buf);
    alarm((unsigned)secs + 60);
    begin();
    uint64_t start = now_ns(), deadline = start + secs * 1000000000ull, bytes = 0, ops = 0;
    while (now_ns() < deadline) {
        ssize_t n = write(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("send: %s", strerror(errno));
        }
        bytes += (uint64_t)n;
        ops++;
    }
    /* Wait for the peer to have read everything (it closes on our EOF). */
    shutdown(fd, SHUT_WR);
    while (read(fd, buf, sizeof buf) > 0) {
    }
    uint64_t end = now_ns();
    alarm(0);
    result(ops, bytes, end - start);
    return 0;
}

static int send_secs(const char *arg)
{
    uint64_t secs = parse_u64(arg, "seconds");
    if (secs < 1 || secs > 3600)
        fail("seconds: 1 to 3600");
    return (int)secs;
}

static int tcp_send(int argc, char **argv)
{
    name = "tcp-send";
    if (argc != 5)
        fail("usage: vireo-io tcp-send IP PORT SECONDS");
    uint64_t secs = (uint64_t)send_secs(argv[4]);
    signal(SIGALRM, on_alarm);
    alarm(CONNECT_SECONDS + 10);
    return send_for(tcp_connect(argv[2], argv[3]), secs);
}

/* Read a connected stream socket until the peer closes; prints the
 * figures (tcp-recv, vsock-recv). */
static int recv_all(int fd)
{
    static char buf[NET_BUF];
    begin();
    uint64_t start = now_ns(), bytes = 0, ops = 0;
    for (;;) {
        /* Each read re-arms the guard: only a stalled transfer times out. */
        alarm(60);
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("recv: %s", strerror(errno));
        }
        if (n == 0)
            break;
        bytes += (uint64_t)n;
        ops++;
    }
    uint64_t end = now_ns();
    alarm(0);
    result(ops, bytes, end - start);
    return 0;
}

static int tcp_recv(int argc, char **argv)
{
    name = "tcp-recv";
    if (argc != 4)
        fail("usage: vireo-io tcp-recv IP PORT");
    signal(SIGALRM, on_alarm);
    alarm(CONNECT_SECONDS + 10);
    return recv_all(tcp_connect(argv[2], argv[3]));
}

/* A CPU-bound loop of exactly 10 integer instructions per iteration (ALU,
 * multiply, shift, a store and a load, LEA, the loop branch), so that
 * instructions per second follow from the guest clock alone (no PMU is
 * needed, in the guest or on the host). Prints
 * "VIREO-CPU <instructions> <ns> <checksum>". */
static int cpu(int argc, char **argv)
{
    uint64_t iters = argc >= 3 ? strtoull(argv[2], 0, 10) : 0;
    if (!iters)
        fail("usage: vireo-io cpu ITERATIONS");
    uint64_t buf[2] = {1, 2};
    uint64_t a = 1, b = 2, d = 3, n = iters;
    uint64_t start = now_ns();
    __asm__ volatile("1:\n\t"
                     "add %[a], %[b]\n\t"
                     "xor %[b], %[d]\n\t"
                     "imul %[d], %[a]\n\t"
                     "shl $3, %[b]\n\t"
                     "mov %[a], (%[p])\n\t"
                     "mov 8(%[p]), %%r8\n\t"
                     "add %%r8, %[a]\n\t"
                     "lea 1(%[a],%[b]), %[b]\n\t"
                     "dec %[n]\n\t"
                     "jnz 1b\n\t"
                     : [a] "+r"(a), [b] "+r"(b), [d] "+r"(d), [n] "+r"(n)
                     : [p] "r"(buf)
                     : "r8", "memory", "cc");
    uint64_t end = now_ns();
    printf("VIREO-CPU %llu %llu %llu\n", (unsigned long long)(iters * 10),
           (unsigned long long)(end - start), (unsigned long long)(a ^ b ^ d));
    return 0;
}


/* Relay between stdin/stdout and a connected socket until the peer closes. */
static int relay(int fd)
{
    static char buf[NET_BUF];
    int in_open = 1;
    for (;;) {
        struct pollfd p[2] = {{fd, POLLIN, 0}, {0, POLLIN, 0}};
        if (poll(p, in_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll: %s", strerror(errno));
        }
        if (p[0].revents) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                fail("recv: %s", strerror(errno));
            }
            if (n == 0)
                return 0;
            for (ssize_t off = 0; off < n;) {
                ssize_t w = write(1, buf + off, (size_t)(n - off));
                if (w < 0)
                    fail("stdout: %s", strerror(errno));
                off += w;
            }
        }
        if (in_open && p[1].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n <= 0) {
                in_open = 0;
                shutdown(fd, SHUT_WR);
                continue;
            }
            for (ssize_t off = 0; off < n;) {
                ssize_t w = write(fd, buf + off, (size_t)(n - off));
                if (w < 0) {
                    if (errno == EINTR)
                        continue;
                    fail("send: %s", strerror(errno));
                }
                off += w;
            }
        }
    }
}

static int vsock_socket(void)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        fail("socket(AF_VSOCK): %s (is the vsock module loaded?)", strerror(errno));
    return fd;
}

/* Connect to CID:PORT, retrying for CONNECT_SECONDS (the host may not
 * listen yet). */
static int vsock_connect_fd(const char *cid, const char *port)
{
    struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                            .svm_cid = (unsigned)parse_u64(cid, "cid"),
                            .svm_port = (unsigned)parse_u64(port, "port")};
    uint64_t deadline = now_ns() + CONNECT_SECONDS * 1000000000ull;
    for (;;) {
        int fd = vsock_socket();
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
            return fd;
        int err = errno;
        close(fd);
        if (now_ns() >= deadline)
            fail("connect to %s:%s: %s", cid, port, strerror(err));
        usleep(200 * 1000);
    }
}

static int tcp_connect_relay(int argc, char **argv)
{
    name = "tcp-connect";
    if (argc != 4)
        fail("usage: vireo-io tcp-connect IP PORT");
    return relay(tcp_connect(argv[2], argv[3]));
}

static int vsock_connect(int argc, char **argv)
{
    name = "vsock-connect";
    if (argc != 4)
        fail("usage: vireo-io vsock-connect CID PORT");
    return relay(vsock_connect_fd(argv[2], argv[3]));
}

static int vsock_send(int argc, char **argv)
{
    name = "vsock-send";
    if (argc != 5)
        fail("usage: vireo-io vsock-send CID PORT SECONDS");
    uint64_t secs = (uint64_t)send_secs(argv[4]);
    signal(SIGALRM, on_alarm);
    alarm(CONNECT_SECONDS + 10);
    return send_for(vsock_connect_fd(argv[2], argv[3]), secs);
}

static int vsock_recv(int argc, char **argv)
{
    name = "vsock-recv";
    if (argc != 4)
        fail("usage: vireo-io vsock-recv CID PORT");
    signal(SIGALRM, on_alarm);
    alarm(CONNECT_SECONDS + 10);
    return recv_all(vsock_connect_fd(argv[2], argv[3]));
}

static int vsock_listen_fd(const char *port)
{
    int fd = vsock_socket();
    struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                            .svm_cid = VMADDR_CID_ANY,
                            .svm_port = (unsigned)parse_u64(port, "port")};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        fail("bind %s: %s", port, strerror(errno));
    if (listen(fd, 128) < 0)
        fail("listen: %s", strerror(errno));
    /* On stderr: stdout is the stream's. */
    fprintf(stderr, "VSOCK-LISTEN %s\n", port);
    return fd;
}

static int vsock_listen(int argc, char **argv)
{
    name = "vsock-listen";
    if (argc != 3)
        fail("usage: vireo-io vsock-listen PORT");
    int l = vsock_listen_fd(argv[2]);
    int fd = accept(l, 0, 0);
    if (fd < 0)
        fail("accept: %s", strerror(errno));
    close(l);
    return relay(fd);
}

static int vsock_echo(int argc, char **argv)
{
    name = "vsock-echo";
    if (argc != 4)
        fail("usage: vireo-io vsock-echo PORT N");
    uint64_t n = parse_u64(argv[3], "connections");
    int l = vsock_listen_fd(argv[2]);
    for (uint64_t i = 0; i < n; i++) {
        int fd = accept(l, 0, 0);
        if (fd < 0)
            fail("accept: %s", strerror(errno));
        pid_t pid = fork();
        if (pid < 0)
            fail("fork: %s", strerror(errno));
        if (pid == 0) {
            static char buf[NET_BUF];
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r < 0 && errno == EINTR)
                    continue;
                if (r <= 0)
                    _exit(r < 0);
                for (ssize_t off = 0; off < r;) {
                    ssize_t w = write(fd, buf + off, (size_t)(r - off));
                    if (w < 0)
                        _exit(1);
                    off += w;
                }
            }
        }
        close(fd);
    }
    int bad = 0, st;
    while (wait(&st) > 0)
        bad += !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    if (bad)
        fail("%d connections failed", bad);
    printf("VSOCK-ECHO %llu\n", (unsigned long long)n);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "blk"))
        return blk(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "tcp-send"))
        return tcp_send(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "tcp-recv"))
        return tcp_recv(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "cpu"))
        return cpu(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "tcp-connect"))
        return tcp_connect_relay(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "vsock-connect"))
        return vsock_connect(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "vsock-listen"))
        return vsock_listen(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "vsock-echo"))
        return vsock_echo(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "vsock-send"))
        return vsock_send(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "vsock-recv"))
        return vsock_recv(argc, argv);
    fail("usage: vireo-io blk|tcp-send|tcp-recv|tcp-connect|cpu|vsock-connect|vsock-listen|vsock-echo|"
         "vsock-send|vsock-recv ...");
    return 1;
}
