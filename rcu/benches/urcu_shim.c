/*
 * Thin C entry points around liburcu's memb flavour for the Rust benchmarks.
 * The read-side loops live here, in C, so liburcu's inline fast path
 * (urcu/static/urcu-memb.h through _LGPL_SOURCE) is what gets measured, not
 * a function call per lock.
 */
#define _LGPL_SOURCE
#include <urcu/urcu-memb.h>
#include <urcu/uatomic.h>
#include <stdint.h>
#include <stdlib.h>

struct shim_obj { uint64_t value; };
static struct shim_obj *shim_ptr;

void shim_register(void) { urcu_memb_register_thread(); }
void shim_unregister(void) { urcu_memb_unregister_thread(); }

void shim_init_ptr(uint64_t v)
{
    struct shim_obj *o = malloc(sizeof(*o));
    o->value = v;
    rcu_set_pointer(&shim_ptr, o);
}

/* n iterations of lock + dereference + unlock; returns a sum so the loads
 * cannot be optimised away. */
uint64_t shim_read_loop(uint64_t n)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        urcu_memb_read_lock();
        struct shim_obj *o = rcu_dereference(shim_ptr);
        sum += o->value;
        urcu_memb_read_unlock();
    }
    return sum;
}

void shim_read_lock(void) { urcu_memb_read_lock(); }
void shim_read_unlock(void) { urcu_memb_read_unlock(); }
void shim_synchronize(void) { urcu_memb_synchronize_rcu(); }

static void shim_free_cb(struct rcu_head *h) { free(h); }

/* n call_rcu enqueues of a freshly allocated head (the allocation is part of
 * what the Rust side pays too). */
void shim_call_rcu_loop(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        struct rcu_head *h = malloc(sizeof(*h));
        urcu_memb_call_rcu(h, shim_free_cb);
    }
}

struct latency_head { struct rcu_head head; volatile int *done; };
static void shim_latency_cb(struct rcu_head *h)
{
    struct latency_head *l = caa_container_of(h, struct latency_head, head);
    uatomic_set(l->done, 1);
    free(l);
}

/* Queues one callback that sets *done. */
void shim_call_rcu_flag(volatile int *done)
{
    struct latency_head *l = malloc(sizeof(*l));
    l->done = done;
    urcu_memb_call_rcu(&l->head, shim_latency_cb);
}

void shim_barrier(void) { urcu_memb_barrier(); }
