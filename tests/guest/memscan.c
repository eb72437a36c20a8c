/*
 * memscan: reads guest physical memory [ADDR, ADDR + MIB MiB) through
 * /proc/kcore (the kernel's direct map of RAM; root only, and only for
 * memory that is online) and says what it holds, page by page. Runs in the
 * distribution kit's busybox guest to show what a rebooted guest finds in
 * memory plugged again after a reset: memcheck's pattern (memcheck.c) left
 * from before, or fresh memory. Prints one line:
 *   MEMSCAN ok pages=P nonzero=Z pattern=M unreadable=U
 *   MEMSCAN error ...
 * where `pattern` counts pages whose first two words are those memcheck
 * writes to the first two words of one of its pages (a false match needs
 * two 64-bit words to agree) and `unreadable` pages the kernel has no
 * direct mapping for (not online). Exits 0 after "ok". Static, no
 * dependencies beyond libc.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096ull

/* memcheck's pattern(page, word) is (page << 12 | word) * K | 1. A page
 * holds the pattern if its first word undoes to some page's word 0 and its
 * second word is that page's word 1: the first word alone matches too
 * much (pattern(0, 0) is 1, a common first word of a kernel page). */
static int is_pattern_page(const uint64_t *pg)
{
    const uint64_t k = 0x9e3779b97f4a7c15ull;
    uint64_t v = pg[0];
    /* The inverse of the odd K modulo 2^64, by Newton's iteration. */
    uint64_t inv = k;
    for (int i = 0; i < 6; i++)
        inv *= 2 - k * inv;
    if (!(v & 1))
        return 0;
    /* (x * K) was v (odd) or v - 1 (even) before the | 1. */
    const uint64_t cand[2] = { v * inv, (v - 1) * inv };
    for (int i = 0; i < 2; i++) {
        uint64_t x = cand[i];
        /* word 0 of a page below 2^28 pages (1 TiB, memcheck's limit) */
        if ((x & 0xfff) == 0 && (x >> 12) < (1ull << 28) && pg[1] == ((x | 1) * k | 1))
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: memscan ADDR MIB   (ADDR: guest physical, hex or decimal)\n");
        return 2;
    }
    char *end;
    uint64_t addr = strtoull(argv[1], &end, 0);
    if (*end || addr % PAGE) {
        printf("MEMSCAN error bad address '%s' (a page-aligned number)\n", argv[1]);
        return 2;
    }
    unsigned long mib = strtoul(argv[2], &end, 10);
    if (*end || mib == 0 || mib > (1ul << 20)) {
        printf("MEMSCAN error bad size '%s'\n", argv[2]);
        return 2;
    }
    int fd = open("/proc/kcore", O_RDONLY);
    if (fd < 0) {
        printf("MEMSCAN error open /proc/kcore: %s\n", strerror(errno));
        return 1;
    }
    Elf64_Ehdr eh;
    if (pread(fd, &eh, sizeof(eh), 0) != (ssize_t)sizeof(eh) ||
        memcmp(eh.e_ident, ELFMAG, SELFMAG) || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
        eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phnum == 0 || eh.e_phnum > 4096) {
        printf("MEMSCAN error /proc/kcore is not a 64-bit ELF core\n");
        return 1;
    }
    Elf64_Phdr *ph = calloc(eh.e_phnum, sizeof(*ph));
    size_t phsize = (size_t)eh.e_phnum * sizeof(*ph);
    if (!ph || pread(fd, ph, phsize, (off_t)eh.e_phoff) != (ssize_t)phsize) {
        printf("MEMSCAN error reading /proc/kcore's program headers\n");
        return 1;
    }
    /* Read in chunks of up to CHUNK pages where one segment holds them
     * all: a read is a system call, and under nested emulation those are
     * what costs. */
    enum { CHUNK = 64 };
    static uint64_t buf[CHUNK * PAGE / 8];
    uint64_t pages = (uint64_t)mib * 256, nonzero = 0, pattern = 0, unreadable = 0;
    for (uint64_t p = 0; p < pages;) {
        uint64_t pa = addr + p * PAGE;
        const Elf64_Phdr *seg = NULL;
        /* RAM segments carry their physical address (others: -1). */
        for (int i = 0; i < eh.e_phnum; i++)
            if (ph[i].p_type == PT_LOAD && ph[i].p_paddr != (Elf64_Addr)-1 &&
                pa >= ph[i].p_paddr && pa + PAGE <= ph[i].p_paddr + ph[i].p_memsz) {
                seg = &ph[i];
                break;
            }
        if (!seg) {
            unreadable++;
            p++;
            continue;
        }
        uint64_t n = (seg->p_paddr + seg->p_memsz - pa) / PAGE;
        if (n > CHUNK)
            n = CHUNK;
        if (n > pages - p)
            n = pages - p;
        if (pread(fd, buf, n * PAGE, (off_t)(seg->p_offset + (pa - seg->p_paddr))) !=
            (ssize_t)(n * PAGE)) {
            unreadable++;
            p++;
            continue;
        }
        for (uint64_t i = 0; i < n; i++) {
            const uint64_t *pg = buf + i * (PAGE / 8);
            int any = 0;
            for (size_t w = 0; w < PAGE / 8 && !any; w++)
                any = pg[w] != 0;
            nonzero += any;
            pattern += any && is_pattern_page(pg);
        }
        p += n;
    }
    printf("MEMSCAN ok pages=%llu nonzero=%llu pattern=%llu unreadable=%llu\n",
           (unsigned long long)pages, (unsigned long long)nonzero, (unsigned long long)pattern,
           (unsigned long long)unreadable);
    return 0;
}
