# The asynchronous I/O engine (engine.pyx): C declarations of
# includes/backend.h and includes/engine.h, and the Engine object.
from libc.stdint cimport uint64_t, int64_t
from cxlflash._core.datapath cimport DataPath
from cxlflash._core.store cimport cxl_store

cdef extern from "engine.h" nogil:
    enum:
        CXL_OP_READ
        CXL_OP_WRITE
        CXL_OP_FLUSH
        CXL_OP_ZERO
        CXL_OP_DISCARD
        CXL_SEG_INLINE
        CXL_REQ_DRAIN
        CXL_REQ_UNATTENDED
        CXL_REQ_LOOP
        CXL_XFER_IN_ERROR
        CXL_XFER_BACKING_ENDED
        CXL_HAVE_URING
        CXL_MAX_INJECT
    unsigned long long CXL_MAX_SEG_BYTES

    ctypedef struct cxl_target:
        int fd
        int zero_mode
        int nowait
        void *obj
    ctypedef struct cxl_io:
        int op
        cxl_target target
        uint64_t offset
        uint64_t len
        char *buf
        void *tag
    ctypedef struct cxl_backend_ops:
        const char *name
    ctypedef struct cxl_backend:
        const cxl_backend_ops *ops
    ctypedef struct cxl_queue:
        int efd
    ctypedef struct cxl_req
    ctypedef struct cxl_seg:
        cxl_req *req
        cxl_io io
        uint64_t done
    ctypedef struct cxl_req:
        cxl_req *qnext
        int op
        int flags
        int status
        int afu_rc
        uint64_t bad
        int nseg
        int seg_left
        cxl_seg *segs
        cxl_seg seg_inline[4]
        int64_t *table_inflight
        const uint64_t *fail_gen
        uint64_t fail_gen_seen
        const uint64_t *epoch
        uint64_t epoch_seen
        cxl_queue *route
        void *owner
        uint64_t index
        int64_t t_submit
        int done
    ctypedef struct cxl_slots:
        long nfree
        cxl_queue q
    int cxl_slots_init(cxl_slots *s, long n)
    cxl_req *cxl_slots_get(cxl_slots *s)
    void cxl_slots_put(cxl_slots *s, cxl_req *r)
    void cxl_slots_destroy(cxl_slots *s)
    ctypedef struct cxl_inject:
        int op
        int64_t res
        long skip
        long count
    ctypedef struct cxl_engine:
        cxl_backend *be
        long depth
        long seg_inflight
        long req_inflight
        cxl_queue pyq
        void (*drain_py)(void *ctx) noexcept nogil
        void *py_ctx
        int pid

    void cxl_backend_destroy(cxl_backend *be)
    int cxl_fd_nowait_class(int fd)
    enum:
        CXL_NOWAIT_NEVER
        CXL_NOWAIT_CACHED
        CXL_NOWAIT_MEMORY
    cxl_backend *cxl_pool_new(int nworkers)
    cxl_backend *cxl_uring_new(unsigned entries)
    int cxl_queue_init(cxl_queue *q, int with_efd)
    void cxl_queue_destroy(cxl_queue *q)
    cxl_req *cxl_queue_take(cxl_queue *q)
    int cxl_queue_empty(cxl_queue *q)
    int cxl_req_reserve(cxl_req *r, int n)
    void cxl_req_clear(cxl_req *r)
    cxl_engine *cxl_engine_new(cxl_backend *be, long depth)
    int cxl_engine_is_ours(cxl_engine *e)
    int cxl_engine_submit_flags(cxl_engine *e, cxl_req *r, int flags)
    int cxl_engine_try_segs(cxl_engine *e, cxl_req *r)
    void cxl_engine_kick(cxl_engine *e)
    int cxl_engine_notify_fd(cxl_engine *e)
    enum:
        CXL_SUBMIT_BATCH
    void cxl_engine_finish(cxl_engine *e, cxl_req *r)
    int cxl_engine_poll(cxl_engine *e, int wait_ms)
    int cxl_engine_try_poll(cxl_engine *e)
    void cxl_engine_wait_queue(cxl_engine *e, cxl_queue *q)
    void cxl_engine_wait_req(cxl_engine *e, cxl_req *r)
    int cxl_engine_wait_req_ms(cxl_engine *e, cxl_req *r, int ms)
    void cxl_engine_wait_idle(void *engine, int64_t *count)
    int cxl_engine_start(cxl_engine *e)
    void cxl_engine_stop(cxl_engine *e)
    void cxl_engine_free(cxl_engine *e)
    int64_t cxl_now_ns()
    int cxl_req_handoff(cxl_req *r, cxl_queue *q)
    int cxl_engine_add_inject(cxl_engine *e, int op, int64_t res, long skip, long count)
    int cxl_engine_ninject(cxl_engine *e)
    void cxl_engine_py_busy(cxl_engine *e, int delta)


cdef class Engine:
    cdef cxl_engine *eng
    cdef cxl_store *store         # the store it serves alone, or NULL (files)
    cdef readonly str kind
    cdef readonly long depth
    cdef readonly bint closed
    cdef object _bridges
    cdef object _all_bridges
    cdef object _last_bridge
    cdef object _close_lock
    cdef long py_inhand           # futures taken from pyq, being completed
    cdef long users               # threads inside the C engine (GIL released)
    cdef object __weakref__

    cdef int _check_open(self) except -1
    cdef int _enter(self) except -1
    cdef int _start(self, object rq, int flags) except -1
    cdef int _drain_pyq(self) except -1
    cdef int _settle_all(self) except -1
    cdef int _drain_bridges(self) except -1
    cdef object _bridge(self)
    cdef int _refuse(self, DataPath dp) except -1
    cdef int _check_store(self, int fd) except -1
    cdef object _submit(self, DataPath dp, int op, object lba, object nblocks,
                        object buffer, int mode)
