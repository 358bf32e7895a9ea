/* The core's locks: a writer-preferring rwlock whose write side is
 * recursive for its holder (tables), and plain mutexes (allocators, the
 * LXT cache).  Every lock is registered with cxlflash._core.locks, whose
 * fork handlers leave each one usable in a forked child. */
#ifndef CXLFLASH_LOCKS_H
#define CXLFLASH_LOCKS_H

#include <pthread.h>

enum {
    CXL_LOCK_RW = 0,        /* a table's rwlock */
    CXL_LOCK_MUTEX = 1,     /* an allocator mutex: taken before a leaf */
    CXL_LOCK_LEAF = 2       /* innermost (the LXT cache) */
};

typedef struct cxl_lock {
    struct cxl_lock *prev, *next;   /* the registry (cxlflash._core.locks) */
    int kind;
    int registered;
    pthread_rwlock_t rw;
    pthread_mutex_t mu;
    unsigned long owner;            /* pthread_self() of the writer, or 0 */
    int depth;                      /* write-lock nesting of the owner */
} cxl_lock;

static inline int cxl_held_by_me(cxl_lock *l)
{
    unsigned long owner = __atomic_load_n(&l->owner, __ATOMIC_RELAXED);
    return owner != 0 && owner == (unsigned long) pthread_self();
}

static inline void cxl_rdlock(cxl_lock *l)
{
    if (cxl_held_by_me(l))
        l->depth++;             /* the writer reads under its own lock */
    else
        pthread_rwlock_rdlock(&l->rw);
}

static inline int cxl_tryrdlock(cxl_lock *l)
{
    if (cxl_held_by_me(l)) {
        l->depth++;
        return 0;
    }
    return pthread_rwlock_tryrdlock(&l->rw);
}

static inline void cxl_wrlock_taken(cxl_lock *l)
{
    __atomic_store_n(&l->owner, (unsigned long) pthread_self(), __ATOMIC_RELAXED);
    l->depth = 1;
}

static inline void cxl_wrlock(cxl_lock *l)
{
    if (cxl_held_by_me(l)) {
        l->depth++;
        return;
    }
    pthread_rwlock_wrlock(&l->rw);
    cxl_wrlock_taken(l);
}

static inline int cxl_trywrlock(cxl_lock *l)
{
    if (cxl_held_by_me(l)) {
        l->depth++;
        return 0;
    }
    if (pthread_rwlock_trywrlock(&l->rw) != 0)
        return -1;
    cxl_wrlock_taken(l);
    return 0;
}

/* Release a read or write hold. */
static inline void cxl_unlock(cxl_lock *l)
{
    if (cxl_held_by_me(l)) {
        if (--l->depth > 0)
            return;
        __atomic_store_n(&l->owner, 0UL, __ATOMIC_RELAXED);
    }
    pthread_rwlock_unlock(&l->rw);
}

static inline void cxl_mutex_lock(cxl_lock *l) { pthread_mutex_lock(&l->mu); }
static inline void cxl_mutex_unlock(cxl_lock *l) { pthread_mutex_unlock(&l->mu); }

#endif
