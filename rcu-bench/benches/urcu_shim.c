/*
 * liburcu's memb flavour (and, compiled with -DSHIM_MB, its mb flavour) for
 * the same-run benchmark (benches/peers.rs).
 *
 * Every timed loop lives here, in C, so liburcu's inline fast path
 * (urcu/static/urcu-memb.h through _LGPL_SOURCE) is what gets measured, with
 * no call per section and no Rust in the loop. build.rs compiles this file
 * with -O2 -ftls-model=initial-exec: the reader's thread-local is reached
 * through %fs, never through __tls_get_addr (the benchmark and
 * tests/shim_tls.rs check the disassembly of the loops).
 *
 * The Rust side passes a stop flag it sets from another thread; loops that
 * run until it is set test it once per 1024 sections, as the Rust loops do.
 */
#define _LGPL_SOURCE
#ifdef SHIM_MB
/* The mb flavour: readers execute real fences (smp_mb in read_lock and
 * read_unlock) and grace periods issue none on their behalf, as our fenced
 * reader mode. Its entry points are named shim_mb_*. */
#include <urcu/urcu-mb.h>
#define FL(name) urcu_mb_##name
#define SHIM(name) shim_mb_##name
#else
#include <urcu/urcu-memb.h>
#define FL(name) urcu_memb_##name
#define SHIM(name) shim_##name
#endif
#include <urcu/uatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE_WORDS 512 /* 4 KiB */

#define STOP_EVERY 1024

void SHIM(register)(void) { FL(register_thread)(); }
void SHIM(unregister)(void) { FL(unregister_thread)(); }
void SHIM(barrier)(void) { FL(barrier)(); }

/* ---- idle read: lock + dereference + unlock ---- */

struct shim_obj { uint64_t value; };
static struct shim_obj *shim_ptr;

void SHIM(init_ptr)(uint64_t v)
{
    struct shim_obj *o = malloc(sizeof(*o));
    if (!o)
        abort();
    o->value = v;
    rcu_set_pointer(&shim_ptr, o);
}

/* n sections; returns the sum of the values read. */
uint64_t SHIM(read_loop)(uint64_t n)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        FL(read_lock)();
        struct shim_obj *o = rcu_dereference(shim_ptr);
        sum += o->value;
        FL(read_unlock)();
    }
    return sum;
}

/* ---- publish: a writer republishes a 4 KiB value, a reader reads it ---- */

struct page {
    struct rcu_head head;
    uint64_t words[PAGE_WORDS];
};
static struct page *page_ptr;

static struct page *page_new(uint64_t v)
{
    struct page *p = malloc(sizeof(*p));
    if (!p)
        abort();
    for (int i = 0; i < PAGE_WORDS; i++)
        p->words[i] = v;
    return p;
}

static void page_free(struct rcu_head *h)
{
    free(caa_container_of(h, struct page, head));
}

void SHIM(page_init)(void)
{
    struct page *old = rcu_xchg_pointer(&page_ptr, page_new(0));
    if (old)
        FL(call_rcu)(&old->head, page_free);
}

/* Reads the page's last word until *stop; *count gets the number of
 * sections, the return value is the sum read. */
uint64_t SHIM(page_read_until)(const int *stop, uint64_t *count)
{
    uint64_t sum = 0, n = 0;
    while (!uatomic_read(stop)) {
        for (int i = 0; i < STOP_EVERY; i++) {
            FL(read_lock)();
            struct page *p = rcu_dereference(page_ptr);
            sum += p->words[PAGE_WORDS - 1];
            FL(read_unlock)();
        }
        n += STOP_EVERY;
    }
    *count = n;
    return sum;
}

/* Replaces the page until *stop, freeing each old one after a grace period
 * with call_rcu (as RcuCell::replace does); returns the number of swaps. */
uint64_t SHIM(page_write_until)(const int *stop)
{
    uint64_t n = 0;
    while (!uatomic_read(stop)) {
        n++;
        struct page *old = rcu_xchg_pointer(&page_ptr, page_new(n));
        FL(call_rcu)(&old->head, page_free);
    }
    return n;
}

/* Replaces the page until *stop, waiting for a grace period after each
 * swap and freeing the old page on this thread (no call_rcu thread: only
 * the reader and this writer run); returns the number of swaps. */
uint64_t SHIM(page_write_sync_until)(const int *stop)
{
    uint64_t n = 0;
    while (!uatomic_read(stop)) {
        n++;
        struct page *old = rcu_xchg_pointer(&page_ptr, page_new(n));
        FL(synchronize_rcu)();
        free(old);
    }
    return n;
}

/* One synchronous swap (swap, synchronize_rcu, free here), for the paced
 * writer: the pacing loop is the harness's, the same Rust code for both
 * sides, so the writer thread spins alike between swaps. */
void SHIM(page_swap_sync)(uint64_t n)
{
    struct page *old = rcu_xchg_pointer(&page_ptr, page_new(n));
    FL(synchronize_rcu)();
    free(old);
}

/* ---- synchronize_rcu ---- */

void SHIM(sync_loop)(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        FL(synchronize_rcu)();
}

/* A reader that keeps entering and leaving sections (50 pause
 * instructions inside each) until *stop. */
void SHIM(busy_reader)(const int *stop)
{
    while (!uatomic_read(stop)) {
        FL(read_lock)();
        for (int i = 0; i < 50; i++)
            caa_cpu_relax();
        FL(read_unlock)();
    }
}

/* ---- call_rcu -> callback latency ---- */

struct flag_head { struct rcu_head head; int *done; };

static void flag_cb(struct rcu_head *h)
{
    struct flag_head *f = caa_container_of(h, struct flag_head, head);
    cmm_smp_wmb(); /* the callback's work before the flag */
    uatomic_set(f->done, 1);
    free(f);
}

/* n times: queue one callback and spin until it has run. */
void SHIM(call_latency_loop)(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        int done = 0;
        struct flag_head *f = malloc(sizeof(*f));
        if (!f)
            abort();
        f->done = &done;
        FL(call_rcu)(&f->head, flag_cb);
        while (!uatomic_read(&done))
            caa_cpu_relax();
    }
}
