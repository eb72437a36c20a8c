/*
 * memcheck: fills MIB mebibytes of anonymous memory with a pattern unique to
 * every 8-byte word of every page, then reads every word back. Runs in the
 * distribution kit's busybox guest to show that hot-plugged memory holds
 * what a program writes. Prints one line:
 *   MEMCHECK ok mib=N pages=P fill_ms=F verify_ms=V
 *   MEMCHECK bad page=P word=W want=X got=Y
 *   MEMCHECK error ...
 * and exits 0 only for "ok". Static, no dependencies beyond libc.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t pattern(uint64_t page, uint64_t word)
{
    /* Distinct per page and word, and never zero (a page that reads back
     * zeros, i.e. was lost and faulted in fresh, cannot pass). */
    return (page << 12 | word) * 0x9e3779b97f4a7c15ull | 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: memcheck MIB\n");
        return 2;
    }
    char *end;
    unsigned long mib = strtoul(argv[1], &end, 10);
    if (*end || mib == 0 || mib > (1ul << 20)) {
        printf("MEMCHECK error bad size '%s'\n", argv[1]);
        return 2;
    }
    const size_t page = 4096, words = page / 8;
    size_t pages = mib * 256;
    uint64_t *m = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        printf("MEMCHECK error mmap of %lu MiB failed\n", mib);
        return 1;
    }
    double t0 = now_ms();
    for (size_t p = 0; p < pages; p++)
        for (size_t w = 0; w < words; w++)
            m[p * words + w] = pattern(p, w);
    double t1 = now_ms();
    for (size_t p = 0; p < pages; p++)
        for (size_t w = 0; w < words; w++) {
            uint64_t got = m[p * words + w], want = pattern(p, w);
            if (got != want) {
                printf("MEMCHECK bad page=%zu word=%zu want=%#llx got=%#llx\n", p, w,
                       (unsigned long long)want, (unsigned long long)got);
                return 1;
            }
        }
    double t2 = now_ms();
    printf("MEMCHECK ok mib=%lu pages=%zu fill_ms=%.0f verify_ms=%.0f\n", mib, pages, t1 - t0,
           t2 - t1);
    return 0;
}
