/*
 * blkstress DEVICE HANG_SECONDS: the load a backend restart must survive, run
 * until SIGTERM, then verified.
 *
 * 4 KiB blocks of DEVICE (at least 24 MiB), each holding a header (magic, block,
 * generation, owner) and bytes derived from it, so a read names what it found:
 *   2 writers       blocks    0..1023, O_DIRECT write then read back, 512 each
 *   1 AIO process   blocks 1024..1535, 16 requests in flight (io_submit), each
 *                   slot writing then reading back its own 32 blocks
 *   2 readers       blocks 2048..6143, written once before the start, read in
 *                   1 MiB O_DIRECT requests
 * On SIGTERM every process finishes what it has in flight, the writers and the
 * AIO process read back every block they own, and the totals are printed:
 *   LOAD ops=N errors=N mismatches=N hung=N verified=N
 * A process making no progress for HANG_SECONDS counts as hung (its request
 * never completed); it is then no longer waited for. Exit status 0 when every
 * count but ops and verified is 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096
#define MAGIC 0x636f6c6f2d626c6bULL
#define WRITERS 2
#define WRITER_BLOCKS 512
#define AIO_FIRST 1024
#define AIO_DEPTH 16
#define AIO_SLOT_BLOCKS 32
#define STATIC_FIRST 2048
#define STATIC_BLOCKS 4096
#define READERS 2
#define READ_CHUNK (1 << 20)
#define PROCS (WRITERS + 1 + READERS)

struct stats {
    volatile uint64_t progress, ops, errors, mismatches, verified;
    volatile int finished;
};

static struct stats *shared;
static volatile int *stop_flag;
static int dev_fd;
static const char *dev;

static void fill(uint8_t *buf, uint64_t block, uint64_t gen, uint64_t owner)
{
    uint64_t *w = (uint64_t *)buf;
    uint64_t x = (block * 0x9e3779b97f4a7c15ULL) ^ (gen + 1) ^ (owner << 56);
    w[0] = MAGIC;
    w[1] = block;
    w[2] = gen;
    w[3] = owner;
    for (size_t i = 4; i < BLK / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
}

/* 1 when BUF is block BLOCK of generation GEN by OWNER; prints the first few misses. */
static int check(struct stats *st, const uint8_t *buf, uint64_t block, uint64_t gen,
                 uint64_t owner)
{
    static uint8_t want[BLK] __attribute__((aligned(8)));
    fill(want, block, gen, owner);
    if (memcmp(buf, want, BLK) == 0)
        return 1;
    const uint64_t *w = (const uint64_t *)buf;
    if (st->mismatches++ < 5)
        printf("LOAD-MISMATCH block %llu: want gen %llu owner %llu, found magic %s gen %llu "
               "owner %llu block %llu\n",
               (unsigned long long)block, (unsigned long long)gen, (unsigned long long)owner,
               w[0] == MAGIC ? "ok" : "bad", (unsigned long long)w[2],
               (unsigned long long)w[3], (unsigned long long)w[1]);
    return 0;
}

static void io_error(struct stats *st, const char *what, uint64_t block, long rc)
{
    if (st->errors++ < 5)
        printf("LOAD-ERROR %s block %llu: %s\n", what, (unsigned long long)block,
               rc < 0 ? strerror((int)-rc) : "short transfer");
}

static int pio(struct stats *st, int write, void *buf, size_t len, uint64_t block)
{
    ssize_t n = write ? pwrite(dev_fd, buf, len, (off_t)block * BLK)
                      : pread(dev_fd, buf, len, (off_t)block * BLK);
    if (n == (ssize_t)len)
        return 1;
    io_error(st, write ? "write" : "read", block, n < 0 ? -errno : 0);
    return 0;
}

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void writer(int id, struct stats *st)
{
    uint8_t *buf = aligned_alloc(BLK, BLK), *back = aligned_alloc(BLK, BLK);
    uint64_t gen[WRITER_BLOCKS] = {0}, first = (uint64_t)id * WRITER_BLOCKS, seed = id + 7;
    /* 0: never written; otherwise the generation last acknowledged. A failed
     * write leaves the block unknown (-1): it is not verified again. */
    while (!*stop_flag) {
        uint64_t k = rnd(&seed) % WRITER_BLOCKS, b = first + k;
        if (gen[k] == UINT64_MAX)
            continue;
        fill(buf, b, gen[k] + 1, 1 + id);
        if (!pio(st, 1, buf, BLK, b)) {
            gen[k] = UINT64_MAX;
            continue;
        }
        gen[k]++;
        if (pio(st, 0, back, BLK, b))
            check(st, back, b, gen[k], 1 + id);
        st->ops += 2;
        st->progress++;
    }
    for (uint64_t k = 0; k < WRITER_BLOCKS; k++) {
        if (gen[k] == 0 || gen[k] == UINT64_MAX)
            continue;
        if (pio(st, 0, back, BLK, first + k) && check(st, back, first + k, gen[k], 1 + id))
            st->verified++;
        st->progress++;
    }
}

static long sys_io_setup(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long sys_io_submit(aio_context_t c, long n, struct iocb **v) { return syscall(SYS_io_submit, c, n, v); }
static long sys_io_getevents(aio_context_t c, long min, long max, struct io_event *e, struct timespec *t)
{
    return syscall(SYS_io_getevents, c, min, max, e, t);
}

struct slot {
    struct iocb cb;
    uint8_t *buf;
    uint64_t block, gen[AIO_SLOT_BLOCKS];
    int k, writing, busy;
};

static void aio_start(aio_context_t ctx, struct slot *s, struct stats *st)
{
    struct iocb *p = &s->cb;
    memset(&s->cb, 0, sizeof(s->cb));
    s->cb.aio_data = (uint64_t)(uintptr_t)s;
    s->cb.aio_fildes = (uint32_t)dev_fd;
    s->cb.aio_lio_opcode = s->writing ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    s->cb.aio_buf = (uint64_t)(uintptr_t)s->buf;
    s->cb.aio_nbytes = BLK;
    s->cb.aio_offset = (int64_t)s->block * BLK;
    long rc = sys_io_submit(ctx, 1, &p);
    s->busy = rc == 1;
    if (rc != 1)
        io_error(st, "io_submit", s->block, rc < 0 ? -errno : 0);
}

/* Picks the slot's next block and starts writing it. */
static void aio_next(aio_context_t ctx, struct slot *s, int i, uint64_t *seed, struct stats *st)
{
    s->k = (int)(rnd(seed) % AIO_SLOT_BLOCKS);
    if (s->gen[s->k] == UINT64_MAX)
        return;
    s->block = AIO_FIRST + (uint64_t)i * AIO_SLOT_BLOCKS + (uint64_t)s->k;
    s->writing = 1;
    fill(s->buf, s->block, s->gen[s->k] + 1, 100 + i);
    aio_start(ctx, s, st);
}

static void aio_load(struct stats *st)
{
    aio_context_t ctx = 0;
    struct slot slots[AIO_DEPTH];
    struct io_event ev[AIO_DEPTH];
    uint64_t seed = 99;
    if (sys_io_setup(AIO_DEPTH, &ctx) < 0) {
        io_error(st, "io_setup", 0, -errno);
        return;
    }
    memset(slots, 0, sizeof(slots));
    for (int i = 0; i < AIO_DEPTH; i++) {
        slots[i].buf = aligned_alloc(BLK, BLK);
        aio_next(ctx, &slots[i], i, &seed, st);
    }
    for (;;) {
        int busy = 0;
        for (int i = 0; i < AIO_DEPTH; i++)
            busy += slots[i].busy;
        if (!busy && *stop_flag)
            break;
        struct timespec t = {1, 0};
        long n = sys_io_getevents(ctx, 1, AIO_DEPTH, ev, &t);
        if (n < 0 && errno != EINTR) {
            io_error(st, "io_getevents", 0, -errno);
            break;
        }
        for (long e = 0; e < n; e++) {
            struct slot *s = (struct slot *)(uintptr_t)ev[e].data;
            int i = (int)(s - slots);
            s->busy = 0;
            st->ops++;
            st->progress++;
            if (ev[e].res != BLK) {
                io_error(st, s->writing ? "aio write" : "aio read", s->block, ev[e].res);
                s->gen[s->k] = UINT64_MAX;
            } else if (s->writing) {
                s->gen[s->k]++;
                s->writing = 0;
                aio_start(ctx, s, st);
                continue;
            } else {
                check(st, s->buf, s->block, s->gen[s->k], 100 + i);
            }
            if (!*stop_flag)
                aio_next(ctx, s, i, &seed, st);
        }
    }
    uint8_t *back = aligned_alloc(BLK, BLK);
    for (int i = 0; i < AIO_DEPTH; i++)
        for (int k = 0; k < AIO_SLOT_BLOCKS; k++) {
            uint64_t g = slots[i].gen[k], b = AIO_FIRST + (uint64_t)i * AIO_SLOT_BLOCKS + k;
            if (g == 0 || g == UINT64_MAX)
                continue;
            if (pio(st, 0, back, BLK, b) && check(st, back, b, g, 100 + i))
                st->verified++;
            st->progress++;
        }
}

static void reader(int id, struct stats *st)
{
    uint8_t *buf = aligned_alloc(BLK, READ_CHUNK);
    uint64_t per = READ_CHUNK / BLK, chunks = STATIC_BLOCKS / per, pos = (uint64_t)id * chunks / 2;
    while (!*stop_flag) {
        uint64_t b = STATIC_FIRST + (pos++ % chunks) * per;
        if (pio(st, 0, buf, READ_CHUNK, b))
            for (uint64_t k = 0; k < per; k++)
                check(st, buf + k * BLK, b + k, 0, 0);
        st->ops++;
        st->progress++;
    }
}

static void on_term(int sig)
{
    (void)sig;
    *stop_flag = 1;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: blkstress DEVICE HANG_SECONDS\n");
        return 2;
    }
    dev = argv[1];
    int hang = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    shared = mmap(NULL, sizeof(struct stats) * PROCS + sizeof(int), PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        return 1;
    memset(shared, 0, sizeof(struct stats) * PROCS + sizeof(int));
    stop_flag = (volatile int *)(shared + PROCS);
    dev_fd = open(dev, O_RDWR | O_DIRECT);
    if (dev_fd < 0) {
        perror(dev);
        return 1;
    }
    /* The readers' blocks, written once and made durable before any load. */
    uint8_t *buf = aligned_alloc(BLK, READ_CHUNK);
    for (uint64_t b = 0; b < STATIC_BLOCKS; b += READ_CHUNK / BLK) {
        for (uint64_t k = 0; k < READ_CHUNK / BLK; k++)
            fill(buf + k * BLK, STATIC_FIRST + b + k, 0, 0);
        if (!pio(&shared[0], 1, buf, READ_CHUNK, STATIC_FIRST + b))
            return 1;
    }
    if (fsync(dev_fd) != 0)
        return 1;

    signal(SIGTERM, on_term);
    pid_t pids[PROCS];
    for (int p = 0; p < PROCS; p++) {
        pids[p] = fork();
        if (pids[p] == 0) {
            signal(SIGTERM, SIG_IGN);
            if (p < WRITERS)
                writer(p, &shared[p]);
            else if (p == WRITERS)
                aio_load(&shared[p]);
            else
                reader(p - WRITERS - 1, &shared[p]);
            shared[p].finished = 1;
            _exit(0);
        }
    }
    printf("LOAD-STARTED\n");

    /* Watch progress: a process whose counter stands still for `hang` seconds
     * is stuck in a request that never completes. */
    uint64_t last[PROCS] = {0};
    int still[PROCS] = {0}, hung[PROCS] = {0}, left = PROCS;
    while (left > 0) {
        sleep(1);
        left = 0;
        for (int p = 0; p < PROCS; p++) {
            if (shared[p].finished || hung[p])
                continue;
            if (shared[p].progress != last[p]) {
                last[p] = shared[p].progress;
                still[p] = 0;
            } else if (++still[p] >= hang) {
                hung[p] = 1;
                printf("LOAD-HUNG process %d (%s) made no progress for %d s\n", p,
                       p < WRITERS ? "writer" : p == WRITERS ? "aio" : "reader", hang);
                continue;
            }
            left++;
        }
    }
    uint64_t ops = 0, errors = 0, mismatches = 0, verified = 0, nhung = 0;
    for (int p = 0; p < PROCS; p++) {
        ops += shared[p].ops;
        errors += shared[p].errors;
        mismatches += shared[p].mismatches;
        verified += shared[p].verified;
        nhung += hung[p];
        if (!hung[p])
            waitpid(pids[p], NULL, 0);
    }
    printf("LOAD ops=%llu errors=%llu mismatches=%llu hung=%llu verified=%llu\n",
           (unsigned long long)ops, (unsigned long long)errors,
           (unsigned long long)mismatches, (unsigned long long)nhung,
           (unsigned long long)verified);
    return errors || mismatches || nhung ? 1 : 0;
}
