"""The asynchronous I/O engine: many requests in flight without the GIL.

One :class:`Engine` serves an adapter, as the AFU served every context in
parallel.  A request -- read, write, flush, write-zeroes, discard -- is
checked and translated at submission, in C, under the table's read lock
(the whole range, as the synchronous data path checks it: a request that
fails completes with its error and never reaches the backing store), then
handed to a backend (``includes/backend.h``) as byte ranges of the store:

- ``io_uring`` where liburing was found at build time and the kernel
  allows it;
- ``threads``, a pthread worker pool running pread/pwrite, otherwise.

``CXLFLASH_ENGINE=io_uring|threads`` forces one; :func:`engine_info` says
which runs and why.  Completions are reaped by whoever needs one (a
waiting ``listio``, ``Future.result()``, a submitter right after
submitting) and by the engine's completer thread for the rest; Python
futures are completed with the GIL taken once per batch, asyncio futures
through an eventfd on their loop (``loop.add_reader``), never a Python
thread per request.

Fencing (tables.pxd): a request counts itself into its table under the
read lock and out when it completes, and every table change takes the
write lock and then waits for that count to reach zero -- so shrink,
release, detach, close and AFU reset wait for the asynchronous requests
of what they take away, and a request submitted afterwards fails as a
synchronous one would.  Requests in flight when an AFU reset begins
complete with the reset error; the futures' layer recovers the context
and re-drives them once, as the block library does.
"""
cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release,
                             PyBUF_SIMPLE, PyBUF_WRITABLE)
from cpython.ref cimport Py_INCREF, Py_DECREF, PyTypeObject
from cpython.object cimport PyObject

cdef extern from "Python.h":
    unsigned long PyThread_get_thread_ident()
    char *PyByteArray_AS_STRING(object o)
    int PyObject_GenericSetDict(object o, object value, void *context) except -1
    object PyObject_GenericGetDict(object o, void *context)
    object PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t nitems)
from libc.errno cimport errno, EINVAL, EIO, ENOMEM, ESHUTDOWN
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, INT64_MAX, uintptr_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memset, strerror
from cxlflash._core.args cimport arg_fd, arg_int, arg_u64, u64_array
from cxlflash._core.tables cimport ResourceTable, RHT_FMT_DIRECT, TABLE_IN_ERROR
from cxlflash._core.rawio cimport raw_requests, raw_fit
from cxlflash._core.store cimport cxl_store, store_of
from cxlflash._core.geometry cimport NO_LIMIT, OFF_MAX
from cxlflash._core.datapath cimport (
    DataPath, check_range, chunk_step, raise_xfer_error, count_list, list_status, XFER_AFU_ERROR, XFER_IN_ERROR,
    XFER_GONE, XFER_FOREIGN, XFER_BACKING_ENDED, XFER_BEYOND_OFF_T,
    IO_AFU_ERROR, IO_IN_ERROR, IO_BEYOND_SIZE)

import errno as _errno
import os
import sys
import threading
import weakref
from time import monotonic as _monotonic

_held = threading.local()       # futures this thread is completing (.n)
from cxlflash._core.args import einval
from cxlflash._core.datapath import list_arrays
from cxlflash._core._lazy import numpy as np     # imported on first use

cdef extern from *:
    """
    #define cxl_atomic_add_i64(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    #define cxl_atomic_load_u64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    """
    int64_t cxl_atomic_add_i64(int64_t *p, int64_t v) nogil
    uint64_t cxl_atomic_load_u64(uint64_t *p) nogil


# Request types (list I/O's LIST_READ/WRITE/UNMAP are 1, 2, 3).
# engine.h reports two of datapath.pxd's XFER_* results from C: the same
# numbers, or the engine would misreport a reset or a short backing store.
if CXL_XFER_IN_ERROR != XFER_IN_ERROR or CXL_XFER_BACKING_ENDED != XFER_BACKING_ENDED:
    raise ImportError("engine.h's CXL_XFER_* differ from datapath.pxd's XFER_*")

OP_READ = CXL_OP_READ
OP_WRITE = CXL_OP_WRITE
OP_FLUSH = CXL_OP_FLUSH
OP_ZERO = CXL_OP_ZERO
OP_DISCARD = CXL_OP_DISCARD
_OP_NAMES = {"read": CXL_OP_READ, "write": CXL_OP_WRITE, "flush": CXL_OP_FLUSH,
             "zero": CXL_OP_ZERO, "discard": CXL_OP_DISCARD}

# How a request is delivered.
cdef enum:
    MODE_SYNC = 0
    MODE_FUTURE = 1
    MODE_ASYNCIO = 2

MAX_DEPTH = 65536
MAX_WORKERS = 1024


# -- translation into segments (nogil, the table's read lock held) ------------------

cdef int add_run(cxl_req *r, int *cap, int op, int fd, int zero_mode, int nowait,
                 uint64_t offset, uint64_t length, char *buf) noexcept nogil:
    """Append segments for ``length`` bytes at ``offset`` (split at
    CXL_MAX_SEG_BYTES): 0 or ENOMEM."""
    cdef uint64_t n
    cdef cxl_seg *s
    while True:
        n = length if length < CXL_MAX_SEG_BYTES else CXL_MAX_SEG_BYTES
        if r.nseg == cap[0]:
            if cxl_req_reserve(r, cap[0] * 2) != 0:
                return ENOMEM
            cap[0] *= 2
        s = &r.segs[r.nseg]
        memset(s, 0, sizeof(cxl_seg))
        s.io.op = op
        s.io.target.fd = fd
        s.io.target.zero_mode = zero_mode
        s.io.target.nowait = nowait
        s.io.offset = offset
        s.io.len = n
        s.io.buf = buf
        r.nseg += 1
        length -= n
        if length == 0:
            return 0
        offset += n
        if buf != NULL:
            buf += n


cdef int build_segs(cxl_req *r, DataPath dp, int op, uint64_t lba, uint64_t nblocks,
                    char *buf) noexcept nogil:
    """The segments of a request that check_range accepted: per command of
    at most max_xfer blocks, per chunk, physically contiguous runs
    coalesced (as the synchronous data path issues them).  0 or ENOMEM."""
    cdef uint32_t handle = dp.handle
    cdef uint64_t bs = dp.block_size
    cdef int fd = dp.table.backing_fd(handle, dp.fd)
    cdef int nowait
    cdef int write = op != CXL_OP_READ
    cdef bint direct = (dp.table.rht[handle].fp >> 4) == RHT_FMT_DIRECT
    cdef uint64_t step = dp._max_xfer if dp._max_xfer else nblocks
    cdef uint64_t cmd, v, left, n, run_p, run_len
    cdef int64_t p
    cdef int cap = CXL_SEG_INLINE, afu_rc = 0, rc, i
    cdef char *cur = buf
    cdef char *run_buf
    cdef cxl_store *store
    r.nseg = 0
    if cxl_req_reserve(r, cap) != 0:
        return ENOMEM
    if dp.nowait_fd != fd:          # found once per backing fd
        dp.nowait_class = cxl_fd_nowait_class(fd)
        dp.nowait_fd = fd
    nowait = dp.nowait_class
    if op == CXL_OP_FLUSH:
        rc = add_run(r, &cap, op, fd, dp.zero_mode, nowait, 0, 0, NULL)
        if rc:
            return rc
        nblocks = 0
    while nblocks:
        cmd = step if nblocks > step else nblocks
        v = lba
        left = cmd
        run_p = 0
        run_len = 0
        run_buf = cur
        while left:
            p = chunk_step(dp.table, handle, direct, v, left, write, &n, &afu_rc)
            if p < 0:
                return EIO              # not after check_range
            if run_len and <uint64_t> p == run_p + run_len:
                run_len += n
            else:
                if run_len:
                    rc = add_run(r, &cap, op, fd, dp.zero_mode, nowait, run_p * bs,
                                 run_len * bs, run_buf)
                    if rc:
                        return rc
                run_p = <uint64_t> p
                run_len = n
                run_buf = cur
            if cur != NULL:
                cur += n * bs
            v += n
            left -= n
        if run_len:
            rc = add_run(r, &cap, op, fd, dp.zero_mode, nowait, run_p * bs, run_len * bs,
                         run_buf)
            if rc:
                return rc
        lba += cmd
        nblocks -= cmd
    store = store_of(fd)
    for i in range(r.nseg):         # the array is final: point back at it
        r.segs[i].req = r
        r.segs[i].io.tag = &r.segs[i]
        r.segs[i].io.target.obj = store
    return 0


cdef int prepare(cxl_req *r, DataPath dp, cxl_engine *eng, int op, uint64_t lba,
                 uint64_t nblocks, char *buf) noexcept nogil:
    """Check and translate a request under the table's read lock, run what
    can complete without blocking, and count the request into the table
    if anything is left for the backend (``seg_left``).  0, or the
    request's status (also stored in it, with ``afu_rc`` and ``bad``): it
    then has no segment."""
    cdef int write = op != CXL_OP_READ and op != CXL_OP_FLUSH
    cdef uint64_t bad = 0
    cdef int rc
    r.op = op
    if op == CXL_OP_FLUSH:
        r.flags = CXL_REQ_DRAIN     # after the writes submitted before it
        nblocks = 0
    dp.table.read_lock()
    rc = check_range(dp.table, dp.handle, dp.block_size, lba, nblocks, write, &r.afu_rc, &bad)
    if rc == 0:
        rc = build_segs(r, dp, op, lba, nblocks, buf)
    if rc == 0:
        # What cannot block on a device runs now, under the read lock, as
        # the synchronous data path runs it; only what is left is counted
        # in flight.
        r.seg_left = cxl_engine_try_segs(eng, r)
    if rc == 0 and r.seg_left:
        cxl_atomic_add_i64(&dp.table.aio_inflight, 1)
        r.table_inflight = &dp.table.aio_inflight
        r.fail_gen = &dp.table.fail_gen
        r.fail_gen_seen = cxl_atomic_load_u64(&dp.table.fail_gen)
        r.epoch = dp.table.epoch_word
        r.epoch_seen = dp.table.epoch_seen
        if dp.table.aio_engine != <void *> eng:
            dp.table.aio_pid = eng.pid
            dp.table.aio_wait = cxl_engine_wait_idle
            dp.table.aio_engine = <void *> eng
    dp.table.unlock()
    if rc:
        r.nseg = 0
        r.status = rc
        r.bad = bad
    return rc


# -- what is made once ------------------------------------------------------------------

# The futures of every engine share one condition (and its lock).
cdef object _shared_lock = threading.RLock()
cdef object _shared_cond = threading.Condition(_shared_lock)
cdef object _lock_acquire = _shared_lock.acquire
cdef object _lock_release = _shared_lock.release
cdef object _future_cls = None
cdef object _cf = None
cdef object _FINISHED = None
cdef object _RUNNING = None
cdef long cond_waiters = 0      # threads waiting on _shared_cond (GIL held)


cdef object future_class():
    """EngineFuture, made on first use (concurrent.futures is imported
    only when a future is wanted)."""
    global _future_cls, _cf, _FINISHED, _RUNNING
    if _future_cls is not None:
        return _future_cls
    import concurrent.futures._base as cf
    _cf = cf
    _FINISHED = cf.FINISHED
    _RUNNING = cf.RUNNING
    FINISHED = cf.FINISHED

    class EngineFuture(cf.Future):
        """A ``concurrent.futures.Future`` completed by the engine.

        ``result()`` and ``exception()`` reap completions themselves while
        they wait (no thread hop when the request is already done or about
        to be).  Once submitted a request cannot be cancelled: ``cancel()``
        returns False, and the buffer stays alive until it completes.
        The futures of an engine share one condition."""

        def result(self, timeout=None):
            if self._state == FINISHED:
                if self._exception is None:
                    return self._result
                raise self._exception
            (<Engine> self._engine)._await_future(self, timeout)
            return cf.Future.result(self, 0)

        def exception(self, timeout=None):
            if self._state != FINISHED:
                (<Engine> self._engine)._await_future(self, timeout)
            return cf.Future.exception(self, 0)

    _future_cls = EngineFuture
    return EngineFuture


# -- requests of futures and asyncio ------------------------------------------------

@cython.no_gc
cdef class _Request:
    """A request submitted for a future: holds what it uses (the buffer,
    the data path, the future) until it completes.  Not tracked by the
    garbage collector: its only cycle (request -> future -> request) is
    broken when it completes, and until then the engine holds it."""
    cdef cxl_req req
    cdef cxl_queue *target      # where it goes when it finishes (NULL: sync)
    cdef Py_buffer view
    cdef bint has_view
    cdef DataPath dp
    cdef Engine engine
    cdef object future
    cdef object value           # the future's result on success
    cdef object bridge          # the asyncio loop's queue, kept alive
    cdef uint64_t lba
    cdef uint64_t nblocks
    cdef int op
    cdef int mode
    cdef bint retried
    cdef bint completed         # its outcome was delivered
    cdef bint copy_out          # value is an aligned view: deliver a bytearray

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
        cxl_req_clear(&self.req)

    cdef object error(self):
        """The exception of a failed request."""
        cdef int status = self.req.status
        cdef int write = self.op != CXL_OP_READ
        if status == ESHUTDOWN:
            return OSError(_errno.ESHUTDOWN, "the adapter's I/O engine was closed "
                           "before the request could run: submit it again on an "
                           "open adapter")
        if status == ENOMEM:
            return MemoryError("no memory for the request's segments")
        try:
            raise_xfer_error(self.dp.table, self.dp.handle, self.dp.fd, status,
                             self.req.afu_rc, self.req.bad, write)
        except BaseException as e:
            return e
        return OSError(EIO, "I/O error")        # not reached

    cdef int start(self, int flags=0) except -1:
        """Check, translate and submit (again, after a recovery); when it
        finished at once (a page-cache hit, a refused range), complete it
        here, else hand it its queue.  Returns 1 when it was completed.
        ``flags``: CXL_SUBMIT_BATCH leaves the kick to the caller."""
        cdef char *buf = <char *> self.view.buf if self.has_view else NULL
        cdef cxl_engine *eng
        cdef int inline_done
        self.engine._enter()
        eng = self.engine.eng
        cxl_req_clear(&self.req)
        self.req.owner = <void *> self
        try:
            with nogil:
                prepare(&self.req, self.dp, eng, self.op, self.lba, self.nblocks, buf)
                if self.mode == MODE_FUTURE:
                    self.req.flags |= CXL_REQ_UNATTENDED
                elif self.mode == MODE_ASYNCIO:
                    self.req.flags |= CXL_REQ_LOOP
                inline_done = cxl_engine_submit_flags(eng, &self.req, flags)
                if not inline_done and self.target != NULL:
                    inline_done = cxl_req_handoff(&self.req, self.target)
        finally:
            self.engine.users -= 1
        if inline_done:
            finish(self)
            return 1
        return 0


cdef int finish(_Request rq) except -1:
    """A request is done (GIL held): re-drive it once after a recovered
    AFU reset, else deliver its outcome.  Drops the engine's reference."""
    cdef DataPath dp = rq.dp
    cdef int status = rq.req.status
    fut = rq.future
    value = None
    if status == XFER_IN_ERROR and not rq.retried and dp.on_reset is not None \
            and not rq.engine.closed:
        rq.retried = True
        try:
            recovered = bool(dp.on_reset())
        except Exception:
            recovered = False
        if recovered:
            try:
                rq.start()      # the engine still holds its reference
                return 0
            except ValueError:
                pass            # the engine closed meanwhile: the reset error
    if rq.has_view:
        PyBuffer_Release(&rq.view)
        rq.has_view = False
    if status == 0:
        if rq.op == CXL_OP_READ:
            dp.stats.reads += 1
            dp.stats.blocks_read += rq.nblocks
        elif rq.op == CXL_OP_WRITE:
            dp.stats.writes += 1
            dp.stats.blocks_written += rq.nblocks
        elif rq.op != CXL_OP_FLUSH:
            dp.stats.unmaps += 1
            dp.stats.blocks_unmapped += rq.nblocks
        value = bytearray(rq.value) if rq.copy_out else rq.value
        exc = None
    else:
        dp.stats.errors += 1
        exc = rq.error()
    rq.future = None
    rq.completed = True
    dp.aio_pending -= 1
    if rq.mode == MODE_FUTURE:
        complete_future(fut, value if exc is None else None, exc)
    elif rq.mode == MODE_ASYNCIO:
        if not fut.done():              # a cancelled task's future
            try:
                if exc is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(exc)
            except RuntimeError:
                pass                    # its loop is closed: nobody awaits it
    else:
        rq.value = value if exc is None else exc
        rq.future = exc
    Py_DECREF(rq)
    return 0


cdef object aligned_view(Py_ssize_t nbytes):
    """A writable view of ``nbytes`` zeroed bytes at a 4096-byte aligned
    address (what O_DIRECT needs), in a bytearray it keeps alive."""
    raw = bytearray(nbytes + 4096)
    cdef uintptr_t addr = <uintptr_t> PyByteArray_AS_STRING(raw)
    cdef Py_ssize_t start = <Py_ssize_t> ((4096 - (addr & 4095)) & 4095)
    return memoryview(raw)[start:start + nbytes]


cdef int complete_future(object fut, object value, object exc) except -1:
    """Finish an EngineFuture under the futures' shared lock, as
    concurrent.futures.wait() and as_completed() expect (they install
    their waiters holding it); the threads waiting on the condition are
    woken only if there are any."""
    cdef dict d = <dict> PyObject_GenericGetDict(fut, NULL)
    _lock_acquire()
    try:
        if exc is None:
            d["_result"] = value
        else:
            d["_exception"] = exc
        d["_state"] = _FINISHED
        waiters = d["_waiters"]
        if waiters:
            for w in waiters:
                if exc is None:
                    w.add_result(fut)
                else:
                    w.add_exception(fut)
        if cond_waiters:
            _shared_cond.notify_all()
    finally:
        _lock_release()
    if d["_done_callbacks"]:
        fut._invoke_callbacks()
    return 0


cdef object new_future(Engine engine, _Request rq):
    """An EngineFuture, RUNNING (it cannot be cancelled), allocated without
    running Future.__init__ (the futures of an engine share one Condition)."""
    cls = future_class()
    fut = PyType_GenericAlloc(<PyTypeObject *> cls, 0)
    PyObject_GenericSetDict(fut, {
        "_condition": _shared_cond, "_state": _RUNNING, "_result": None,
        "_exception": None, "_waiters": [], "_done_callbacks": [],
        "_engine": engine, "_request": rq}, NULL)
    return fut


cdef void drain_py_cb(void *ctx) noexcept nogil:
    # an exception is reported as unraisable (noexcept)
    """The completer thread's hook: complete the futures it reaped."""
    with gil:
        (<Engine> ctx)._drain_pyq()


_ONE = (1).to_bytes(8, sys.byteorder)


cdef class _LoopBridge:
    """An asyncio loop's queue of completed requests, and its eventfd,
    which the loop watches (``add_reader``)."""
    cdef cxl_queue q
    cdef bint ready
    cdef object loop_ref        # weak: the engine's map of bridges is keyed by it
    cdef Engine engine
    cdef int notify_fd          # the backend's, also watched by this loop
    cdef unsigned long thread   # the thread its loop last ran in
    cdef object __weakref__

    def __cinit__(self, loop):
        if cxl_queue_init(&self.q, 1) != 0:
            raise OSError(errno, "cannot make an eventfd for the asyncio loop")
        self.ready = True
        self.notify_fd = -1
        self.loop_ref = weakref.ref(loop)
        loop.add_reader(self.q.efd, self._on_ready)

    cdef int watch_backend(self, Engine engine) except -1:
        self.engine = engine
        self.notify_fd = cxl_engine_notify_fd(engine.eng)
        self.loop_ref().add_reader(self.notify_fd, self._on_backend)
        return 0

    @property
    def loop(self):
        return self.loop_ref()

    def _on_ready(self):
        try:
            os.read(self.q.efd, 8)
        except BlockingIOError:
            pass
        self.drain()

    def _on_backend(self):
        """The backend has completions: reap them here, in the loop's
        thread, rather than wait for the completer thread to hand them
        over (a thread hop and a second wake-up per batch)."""
        cdef Engine eng = self.engine
        cdef int n = 0
        try:
            os.read(self.notify_fd, 8)
        except BlockingIOError:
            pass
        if eng.eng != NULL and not eng.closed:
            eng.users += 1
            try:
                with nogil:
                    n = cxl_engine_try_poll(eng.eng)
            finally:
                eng.users -= 1
            if n < 0:
                # Another thread (another loop) is reaping and may already
                # have passed what woke this one, whose wake-up this read
                # took: look again on the next iteration, not never.
                os.write(self.notify_fd, _ONE)
        self.drain()

    cdef int drain(self) except -1:
        cdef cxl_req *r = cxl_queue_take(&self.q)
        cdef cxl_req *nxt
        while r != NULL:
            while r != NULL:
                nxt = r.qnext
                finish(<_Request> r.owner)
                r = nxt
            r = cxl_queue_take(&self.q)
        return 0

    def close(self):
        loop = self.loop_ref()
        if loop is not None:
            try:
                loop.remove_reader(self.q.efd)
                if self.notify_fd >= 0:
                    loop.remove_reader(self.notify_fd)
            except Exception:
                pass        # the loop is closed

    def __dealloc__(self):
        if self.ready:
            cxl_queue_destroy(&self.q)


# -- the engine ------------------------------------------------------------------------------

_live_engines = weakref.WeakSet()
cdef dict _probe = {}


def _close_all():
    for e in list(_live_engines):
        try:
            e.close()
        except Exception:
            pass


import atexit
atexit.register(_close_all)


cdef long count_arg(object value, const char *name, long top) except -1:
    """An integer in 1..top: TypeError, or OSError(EINVAL) naming the range."""
    cdef object v = arg_int(value, name)
    if v < 1 or v > top:
        raise einval(f"{name.decode()} must be 1..{top}, got {v}")
    return <long> v


cdef str backend_reason(int err):
    if not CXL_HAVE_URING:
        return "liburing was not found when cxlflash was built"
    return f"the kernel refused io_uring: {strerror(err).decode()}"


def engine_info():
    """Which engine an adapter gets here, and why: ``{"engine", "liburing",
    "io_uring", "reason", "forced"}``."""
    cdef cxl_backend *be
    if not _probe:
        if CXL_HAVE_URING:
            be = cxl_uring_new(8)
            if be != NULL:
                cxl_backend_destroy(be)
                _probe["io_uring"] = True
                _probe["reason"] = ""
            else:
                _probe["io_uring"] = False
                _probe["reason"] = backend_reason(errno)
        else:
            _probe["io_uring"] = False
            _probe["reason"] = backend_reason(0)
    forced = os.environ.get("CXLFLASH_ENGINE") or None
    if forced == "threads":
        engine = "threads"
    elif forced == "io_uring" or _probe["io_uring"]:
        engine = "io_uring"
    else:
        engine = "threads"
    return {"engine": engine, "liburing": bool(CXL_HAVE_URING),
            "io_uring": _probe["io_uring"],
            "reason": ("forced by CXLFLASH_ENGINE=threads" if forced == "threads"
                       else _probe["reason"]),
            "forced": forced}


cdef class Engine:
    """Engine(kind=None, depth=256, workers=None, store=None)

    The asynchronous I/O engine of an adapter.  ``kind``: "io_uring",
    "threads", or None (``CXLFLASH_ENGINE``, else io_uring where it works,
    else threads).  ``depth``: backend operations in flight at most
    (1..65536); a full engine makes the submitter wait for a completion
    (back-pressure: nothing is dropped).  ``workers``: threads of the
    thread-pool engine (default min(depth, 64)).

    ``store``: the descriptor of a store that is not a file (store.pyx):
    the engine then serves that store alone, with the store's own backend
    (an RBD image's aio calls; ``kind`` is "rbd"), or a thread pool calling
    it (``kind`` "remote").
    """

    def __cinit__(self, kind=None, depth=256, workers=None, store=None):
        cdef long d = count_arg(depth, b"depth", MAX_DEPTH)
        cdef long nw
        cdef cxl_backend *be = NULL
        cdef int err = 0
        self.eng = NULL
        self.store = NULL
        self.closed = True
        forced = os.environ.get("CXLFLASH_ENGINE") or None
        want = kind if kind is not None else forced
        if store is not None:
            # The engine of a store that is not a file: its own backend
            # (an RBD image's aio calls), else the thread pool calling it.
            self.store = store_of(arg_fd(store))
            if self.store == NULL:
                raise OSError(EINVAL, f"descriptor {store} names no store")
            be = <cxl_backend *> self.store.ops.backend_new(self.store, d) \
                if self.store.ops.backend_new != NULL else NULL
            if be == NULL and self.store.ops.backend_new != NULL:
                raise OSError(errno, f"cannot make the engine of the "
                              f"{self.store.ops.name.decode()} store")
            want = "threads"
        elif want not in (None, "io_uring", "threads"):
            raise ValueError(f"unknown engine {want!r}"
                             + (" (from CXLFLASH_ENGINE)" if kind is None else "")
                             + ": use 'io_uring' or 'threads'")
        if want != "threads" and store is None:
            be = cxl_uring_new(<unsigned> (d if d >= 64 else 64))
            if be == NULL:
                err = errno
                if want == "io_uring":
                    raise OSError(_errno.ENOSYS, "the io_uring engine is not "
                                  f"available: {backend_reason(err)}; use "
                                  "CXLFLASH_ENGINE=threads")
        if be == NULL:
            nw = count_arg(workers if workers is not None else
                           min(d, 64 if store is None else 8),
                           b"workers", MAX_WORKERS)
            be = cxl_pool_new(<int> nw)
            if be == NULL:
                raise OSError(errno, "cannot start the I/O worker threads")
            self.kind = "threads" if self.store == NULL else self.store.ops.name.decode()
        elif self.store != NULL:
            self.kind = self.store.ops.name.decode()
        else:
            self.kind = "io_uring"
        self.eng = cxl_engine_new(be, d)
        if self.eng == NULL:
            cxl_backend_destroy(be)
            raise MemoryError("cannot make the I/O engine")
        self.depth = d
        self.eng.drain_py = drain_py_cb
        self.eng.py_ctx = <void *> self
        err = cxl_engine_start(self.eng)
        if err:
            cxl_engine_free(self.eng)
            self.eng = NULL
            raise OSError(-err, "cannot start the I/O engine's completion thread")
        self.closed = False
        self._bridges = weakref.WeakKeyDictionary()
        self._all_bridges = weakref.WeakSet()       # those of closed loops too
        self._close_lock = threading.Lock()
        _live_engines.add(self)

    def __dealloc__(self):
        if self.eng != NULL and cxl_engine_is_ours(self.eng):
            self.eng.drain_py = NULL
            with nogil:
                cxl_engine_stop(self.eng)
            cxl_engine_free(self.eng)
        self.eng = NULL         # a forked child leaves the parent's alone

    @property
    def inflight(self):
        """Requests in flight now."""
        return self.eng.req_inflight if self.eng != NULL else 0

    @property
    def injected(self):
        """Faults queued by :meth:`inject` not yet applied."""
        return cxl_engine_ninject(self.eng) if self.eng != NULL else 0

    cdef int _check_store(self, int fd) except -1:
        """A store that is not a file has an engine of its own (its
        backend is the store's); the adapter's engine takes only files."""
        if store_of(fd) != self.store:
            raise OSError(EINVAL, "this LUN's backing store is served by an engine of its "
                          "own: use the LUN object's methods (or Engine(store=fd)), "
                          "not this engine")
        return 0

    cdef int _refuse(self, DataPath dp) except -1:
        """A request on a closed engine fails as the synchronous call
        would (the adapter closed: the table is GONE), else ValueError."""
        cdef int rc = 0, afu_rc = 0
        cdef uint64_t bad = 0
        if dp.closed:
            raise ValueError("I/O on a closed LUN: the resource was released "
                             "or its context detached")
        dp.table._rlock()
        rc = check_range(dp.table, dp.handle, dp.block_size, 0, 0, 0, &afu_rc, &bad)
        dp.table.unlock()
        if rc:
            raise_xfer_error(dp.table, dp.handle, dp.fd, rc, afu_rc, bad, 0)
        self._check_open()
        return 0

    cdef int _start(self, object request, int flags) except -1:
        """rq.start() for a new request; if the engine refuses it (closed
        meanwhile), undo what submitting it counted."""
        cdef _Request rq = <_Request> request
        try:
            return rq.start(flags)
        except BaseException:
            rq.dp.aio_pending -= 1
            Py_DECREF(rq)               # the engine's reference
            raise

    cdef int _enter(self) except -1:
        """Before a GIL-free call into the C engine: refuse a closed one,
        and count this thread in (``close()`` frees the engine only when no
        thread is inside).  The check and the count are one step under the
        GIL."""
        if self.closed or self.eng == NULL:
            raise ValueError("the I/O engine is closed (its adapter was closed)")
        self.users += 1
        return 0

    cdef int _check_open(self) except -1:
        if self.closed:
            raise ValueError("the I/O engine is closed (its adapter was closed)")
        if not cxl_engine_is_ours(self.eng):
            raise ValueError("this I/O engine belongs to the parent process: a "
                             "forked child uses its adapter's own")
        return 0

    def close(self):
        """Complete every request in flight (their futures get their
        outcome), then stop the engine: its threads end and its file
        descriptors (ring, eventfds) are closed before this returns.
        Safe to call twice."""
        if self.closed or self.eng == NULL:
            return
        with self._close_lock:
            if self.closed:
                return
            if not cxl_engine_is_ours(self.eng):
                self.closed = True      # a forked child leaves it alone
                return
            with nogil:
                cxl_engine_stop(self.eng)
            self._settle_all()
            for bridge in list(self._all_bridges):
                (<_LoopBridge> bridge).drain()
                bridge.close()
            self.closed = True
            # No thread may still be inside the engine (releasing a lock, say)
            # when it is freed; none enters once it is closed.
            while self.users > 0:
                _cond_wait(None, 1)
            self._bridges = weakref.WeakKeyDictionary()
            self._all_bridges = weakref.WeakSet()
            self._last_bridge = None
            self.eng.drain_py = NULL
            cxl_engine_free(self.eng)
            self.eng = NULL
        _live_engines.discard(self)

    def inject(self, result, count=1, op=None, skip=0):
        """For tests: the next ``count`` backend completions (of ``op`` --
        "read", "write", "flush", "zero", "discard" -- if given, after
        ``skip`` of them) report ``result`` instead of what the backend
        did: ``-errno``, or a byte count smaller than the transfer (a
        short transfer, which the engine continues)."""
        self._check_open()
        cdef int o = 0
        if op is not None:
            if op not in _OP_NAMES:
                raise ValueError(f"op must be one of {sorted(_OP_NAMES)}, got {op!r}")
            o = _OP_NAMES[op]
        cdef object r = arg_int(result, b"result")
        if r < -4095 or r > INT64_MAX:
            raise einval(f"result must be -errno (-4095..-1) or a byte count "
                         f"(0..2**63-1), got {r}")
        cdef int64_t res = r
        cdef long c = <long> arg_u64(count, b"count", 1 << 30)
        cdef long s = <long> arg_u64(skip, b"skip", 1 << 30)
        if c < 1:
            raise einval("count must be at least 1")
        if cxl_engine_add_inject(self.eng, o, res, s, c) != 0:
            raise OSError(_errno.ENOSPC, f"at most {CXL_MAX_INJECT} faults can be queued")

    # -- completion -------------------------------------------------------------------

    cdef int _drain_pyq(self) except -1:
        cdef cxl_req *r
        cdef cxl_req *nxt
        cdef cxl_req *p
        if self.eng == NULL:
            return 0
        cdef long n
        r = cxl_queue_take(&self.eng.pyq)
        while r != NULL:
            n = 0
            p = r
            while p != NULL:            # taken: in this thread's hands
                n += 1
                p = p.qnext
            self.py_inhand += n
            _held.n = getattr(_held, "n", 0) + n
            while r != NULL:
                nxt = r.qnext
                try:
                    finish(<_Request> r.owner)
                finally:
                    self.py_inhand -= 1
                    _held.n -= 1
                r = nxt
            if self.eng == NULL:
                break
            r = cxl_queue_take(&self.eng.pyq)
        return 0

    cdef int _settle_all(self) except -1:
        """Complete the futures of every request that has finished: those
        waiting in the queue here, and wait for those another thread is
        completing."""
        self._drain_pyq()
        # (not those this thread holds: a future's callback may get here)
        while self.py_inhand - getattr(_held, "n", 0) > 0:
            _cond_wait(None, 1)
            self._drain_pyq()
        return 0

    def settle_completed(self):
        """Complete the futures of every request that has already
        finished: those in the engine's queue, those another thread is
        completing, and those of this thread's asyncio loop and of loops
        no longer running.  A fence (shrink, release, detach, reset)
        waits for the requests it fences to finish; this makes their
        futures done too before it returns."""
        if self.closed or self.eng == NULL:
            return
        self._settle_all()
        self._drain_bridges()

    cdef int _drain_bridges(self) except -1:
        """Complete what sits in the queues of this thread's loop and of
        loops that no longer run (never another thread's running loop)."""
        loop = _running_loop()
        for b in list(self._all_bridges):
            bl = (<_LoopBridge> b).loop_ref()
            if bl is None or bl is loop or not bl.is_running():
                (<_LoopBridge> b).drain()
        return 0

    def _await_future(self, fut, timeout):
        """Wait for an EngineFuture: reap until its request is done,
        complete what was reaped, then (if another thread holds its
        completion) wait on the futures' condition."""
        cdef _Request rq = fut._request
        cdef int ms, done = 0
        deadline = None if timeout is None else _monotonic() + timeout
        cxl_engine_py_busy(self.eng, 1)
        try:
            while fut._state != _cf.FINISHED:
                ms = 50
                if deadline is not None:
                    left = deadline - _monotonic()
                    if left <= 0:
                        break
                    ms = max(1, min(50, int(left * 1000)))
                if rq is not None and not done and not self.closed:
                    self.users += 1
                    try:
                        with nogil:
                            done = cxl_engine_wait_req_ms(self.eng, &rq.req, ms)
                    finally:
                        self.users -= 1
                    self._drain_pyq()
                else:
                    # its completion is in another thread's hands
                    cxl_engine_py_busy(self.eng, -1)
                    try:
                        _cond_wait(fut, ms)
                    finally:
                        cxl_engine_py_busy(self.eng, 1)
        finally:
            cxl_engine_py_busy(self.eng, -1)
            if not cxl_queue_empty(&self.eng.pyq):
                self._drain_pyq()
        if fut._state != _cf.FINISHED:
            raise _cf.TimeoutError()

    def settle(self, DataPath dp not None):
        """Return once every request submitted through ``dp`` has its
        future completed (reaping, and completing what was reaped, in
        this thread; those of the running asyncio loop too)."""
        while dp.aio_pending > 0 and self.eng != NULL and not self.closed:
            self.users += 1
            try:
                with nogil:
                    cxl_engine_poll(self.eng, 1)
            finally:
                self.users -= 1
            self._drain_pyq()
            self._drain_bridges()
            if dp.aio_pending > 0:
                _cond_wait(None, 1)

    # -- submission -------------------------------------------------------------------

    cdef object _bridge(self):
        """The running loop's bridge.  The last one is reused when this is
        its loop's thread and that loop runs: one thread runs one loop at a
        time, so it is this coroutine's loop -- without asking asyncio,
        whose get_running_loop() makes a getpid() system call each time."""
        global _get_running_loop
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef _LoopBridge last = self._last_bridge
        if last is not None and last.thread == me:
            loop = last.loop_ref()
            if loop is not None and loop.is_running():
                return last
        if _get_running_loop is None:
            from asyncio import get_running_loop
            _get_running_loop = get_running_loop
        loop = _get_running_loop()
        b = self._bridges.get(loop)
        if b is None:
            b = _LoopBridge(loop)
            (<_LoopBridge> b).watch_backend(self)
            self._bridges[loop] = b
            self._all_bridges.add(b)
        (<_LoopBridge> b).thread = me
        self._last_bridge = b
        return b

    def submit(self, DataPath dp not None, int op, lba=0, nblocks=None, buffer=None,
               int mode=MODE_FUTURE):
        """Submit one request through ``dp``: ``op`` OP_READ (into
        ``buffer``, or a new bytearray of ``nblocks`` blocks), OP_WRITE
        (``buffer``), OP_FLUSH, OP_ZERO or OP_DISCARD (``nblocks``).
        ``mode`` 0: wait and return the result (or raise); 1: return an
        EngineFuture; 2: return an asyncio future of the running loop.
        Arguments are checked here, before anything is submitted."""
        return self._submit(dp, op, lba, nblocks, buffer, mode)

    # The hot entry points, bound per LUN object (cxlflash/lun.py).
    def aread(self, DataPath dp not None, lba, nblocks):
        return self._submit(dp, CXL_OP_READ, lba, nblocks, None, MODE_FUTURE)

    def areadinto(self, DataPath dp not None, lba, buffer):
        return self._submit(dp, CXL_OP_READ, lba, None, buffer, MODE_FUTURE)

    def awrite(self, DataPath dp not None, lba, data):
        return self._submit(dp, CXL_OP_WRITE, lba, None, data, MODE_FUTURE)

    def aread_loop(self, DataPath dp not None, lba, nblocks):
        return self._submit(dp, CXL_OP_READ, lba, nblocks, None, MODE_ASYNCIO)

    def areadinto_loop(self, DataPath dp not None, lba, buffer):
        return self._submit(dp, CXL_OP_READ, lba, None, buffer, MODE_ASYNCIO)

    def awrite_loop(self, DataPath dp not None, lba, data):
        return self._submit(dp, CXL_OP_WRITE, lba, None, data, MODE_ASYNCIO)

    cdef object _submit(self, DataPath dp, int op, object lba, object nblocks,
                        object buffer, int mode):
        if self.closed or not cxl_engine_is_ours(self.eng):
            self._refuse(dp)
        self._check_store(dp.fd)
        if op < CXL_OP_READ or op > CXL_OP_DISCARD:
            raise ValueError(f"not a request type: {op}")
        if mode < MODE_SYNC or mode > MODE_ASYNCIO:
            raise ValueError(f"not a mode: {mode}")
        cdef uint64_t v = arg_u64(lba, b"lba", NO_LIMIT)
        cdef uint64_t n = 0
        cdef int flags
        cdef _Request rq = _Request.__new__(_Request)
        cdef _LoopBridge bridge = None
        rq.dp = dp
        rq.engine = self
        rq.op = op
        rq.mode = mode
        if op == CXL_OP_READ or op == CXL_OP_WRITE:
            if buffer is None:
                if op == CXL_OP_WRITE:
                    raise TypeError("a write needs its data")
                n = arg_u64(nblocks, b"nblocks", NO_LIMIT)
                dp._check(v, n)             # before allocating
                if dp.nowait_fd != dp.fd:
                    dp.nowait_class = cxl_fd_nowait_class(dp.fd)
                    dp.nowait_fd = dp.fd
                if dp.nowait_class == CXL_NOWAIT_NEVER:
                    # O_DIRECT needs an aligned buffer: read into one, hand
                    # over a bytearray copy of it
                    buffer = aligned_view(n * dp.block_size)
                    rq.copy_out = True
                else:
                    buffer = bytearray(n * dp.block_size)
                rq.value = buffer
            flags = PyBUF_SIMPLE if op == CXL_OP_WRITE else PyBUF_SIMPLE | PyBUF_WRITABLE
            PyObject_GetBuffer(buffer, &rq.view, flags)
            rq.has_view = True
            if rq.view.len % dp.block_size:
                raise ValueError(f"{'data' if op == CXL_OP_WRITE else 'buffer'} size "
                                 f"{rq.view.len} is not a multiple of the block "
                                 f"size {dp.block_size}")
            n = rq.view.len // dp.block_size
            if rq.value is None:
                rq.value = n
        elif op != CXL_OP_FLUSH:
            n = arg_u64(nblocks, b"nblocks", NO_LIMIT)
            rq.value = n
        else:
            v = 0
        dp._check(v, n)
        rq.lba = v
        rq.nblocks = n
        if mode == MODE_FUTURE:
            fut = new_future(self, rq)
            rq.future = fut
            rq.target = &self.eng.pyq
        elif mode == MODE_ASYNCIO:
            bridge = self._bridge()
            rq.bridge = bridge
            fut = bridge.loop_ref().create_future()
            rq.future = fut
            rq.target = &bridge.q
        Py_INCREF(rq)                   # the engine's, until finish()
        dp.aio_pending += 1
        if op == CXL_OP_READ:
            dp.stats.areads += 1
        elif op == CXL_OP_WRITE:
            dp.stats.awrites += 1
        if mode == MODE_SYNC:
            self._start(rq, 0)
            while not rq.completed:         # (re-driven once after a recovery)
                if not rq.req.done:         # (a closed engine finished it)
                    self._enter()
                    try:
                        with nogil:
                            cxl_engine_wait_req(self.eng, &rq.req)
                    finally:
                        self.users -= 1
                finish(rq)
            if op == CXL_OP_FLUSH:
                # the futures of the requests it covered are done too
                self._settle_all()
            if rq.future is not None:
                raise rq.future
            return rq.value
        if mode == MODE_FUTURE:
            cxl_engine_py_busy(self.eng, 1)     # this thread completes what it reaps
        try:
            if mode == MODE_ASYNCIO:
                # Started at once (kept for the loop's next iteration, fewer
                # requests were in flight on a device); the loop reaps.
                self._start(rq, 0)
            elif not self._start(rq, 0) and not self.closed:    # in flight: reap
                self.users += 1
                try:
                    with nogil:
                        cxl_engine_try_poll(self.eng)
                finally:
                    self.users -= 1
                self._drain_pyq()
        finally:
            if mode == MODE_FUTURE:
                cxl_engine_py_busy(self.eng, -1)
        if mode == MODE_FUTURE and not cxl_queue_empty(&self.eng.pyq):
            self._drain_pyq()
        return fut

    # -- list I/O ----------------------------------------------------------------------

    def listio(self, DataPath dp not None, ops, lbas, nblocks, buffer, offsets=None,
               lat_ns=None, qd=64):
        """DataPath.listio through the engine: the requests run ``qd`` at
        a time (1..65536); the same arguments, checks and per-request
        status codes."""
        self._check_open()
        if dp.closed:
            raise ValueError("I/O on a closed LUN: the resource was released "
                             "or its context detached")
        self._check_store(dp.fd)
        cdef long depth = count_arg(qd, b"qd", MAX_DEPTH)
        o_arr, l_arr, c_arr, off_arr = list_arrays(ops, lbas, nblocks, offsets,
                                                   dp.block_size)
        cdef const uint8_t[::1] o = o_arr
        cdef const uint64_t[::1] l = l_arr
        cdef const uint64_t[::1] c = c_arr
        cdef const uint64_t[::1] off = off_arr
        cdef Py_ssize_t n = o.shape[0], i
        cdef bint timed = lat_ns is not None
        cdef int64_t[::1] lat = lat_ns if timed else _no_lat
        if timed and lat.shape[0] < n:
            raise ValueError("lat_ns is shorter than the request list")
        cdef bint may_recover = dp.on_reset is not None
        cdef bint in_error
        dp.table._rlock()
        in_error = dp.table.live_state() == TABLE_IN_ERROR
        dp.table.unlock()
        if in_error and may_recover:
            may_recover = bool(dp.on_reset())
        status = np.zeros(n, dtype=np.int64)
        codes = np.zeros(n, dtype=np.int32)
        cdef int64_t[::1] st = status
        cdef int[::1] cd = codes
        cdef Py_buffer view
        cdef Py_ssize_t nreset = 0
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            self._enter()
        except BaseException:
            PyBuffer_Release(&view)
            raise
        try:
            with nogil:
                nreset = run_list(self.eng, dp, o, l, c, off, <char *> view.buf,
                                  <uint64_t> view.len, st, cd, lat, timed,
                                  <Py_ssize_t> depth, 0)
            if nreset < 0:
                raise MemoryError("no memory for the list's requests")
            if nreset and may_recover and dp.on_reset() and not self.closed:
                with nogil:
                    nreset = run_list(self.eng, dp, o, l, c, off, <char *> view.buf,
                                      <uint64_t> view.len, st, cd, lat, timed,
                                      <Py_ssize_t> depth, 1)
                if nreset < 0:
                    raise MemoryError("no memory for the list's requests")
        finally:
            self.users -= 1
            PyBuffer_Release(&view)
        count_list(&dp.stats, o, c, st)
        return status, codes

    def raw_listio(self, fd, ops, offsets, nbytes, buffer, buf_offsets=None, qd=64,
                   lat_ns=None):
        """The bare store's baseline: ``nbytes`` at each byte offset of
        ``fd`` (ops 1 read, 2 write) through this engine at queue depth
        ``qd``, no translation.  Every request is checked first; raises
        OSError for the first that failed (after all completed); returns
        the number of requests."""
        self._check_open()
        cdef int f = arg_fd(fd)
        self._check_store(f)
        cdef uint64_t nb = arg_u64(nbytes, b"nbytes", OFF_MAX)
        cdef long depth = count_arg(qd, b"qd", MAX_DEPTH)
        if nb > CXL_MAX_SEG_BYTES:
            raise einval(f"nbytes must be at most {CXL_MAX_SEG_BYTES}")
        o_arr, off_arr, boff_arr = raw_requests(ops, offsets, nb, buf_offsets, lat_ns)
        cdef const uint64_t[::1] o = o_arr
        cdef const uint64_t[::1] off = off_arr
        cdef const uint64_t[::1] boff = boff_arr
        cdef Py_ssize_t n = o.shape[0]
        cdef bint timed = lat_ns is not None
        cdef int64_t[::1] lat = lat_ns if timed else _no_lat
        cdef Py_buffer view
        cdef int64_t bad = -1
        cdef int64_t[::1] st
        status = np.zeros(n, dtype=np.int64)
        st = status
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            raw_fit(boff, nb, buf_offsets is None, <uint64_t> view.len)
            self._enter()
            try:
                with nogil:
                    bad = run_raw(self.eng, f, o, off, nb, boff, <char *> view.buf, st,
                                  lat, timed, <Py_ssize_t> depth)
            finally:
                self.users -= 1
        finally:
            PyBuffer_Release(&view)
        if bad == -2:
            raise MemoryError("no memory for the requests")
        if bad >= 0:
            err = st[bad]
            if err == XFER_BACKING_ENDED:
                raise OSError(_errno.EIO, f"request {bad}: the backing store ended "
                              "before its bytes (it is shorter than the offsets "
                              "addressed)")
            if err == ESHUTDOWN:
                raise ValueError(f"the I/O engine was closed during the batch: request "
                                 f"{bad} and the requests not yet started did not run")
            raise OSError(err, f"request {bad}: {os.strerror(err)}")
        return n


cdef object _get_running_loop = None


cdef object _running_loop():
    """The running asyncio loop of this thread, or None (asyncio is not
    imported for this)."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return None
    try:
        return aio.get_running_loop()
    except RuntimeError:
        return None





cdef int _cond_wait(object fut, int ms) except -1:
    """Wait on the futures' condition for up to ``ms`` (unless ``fut`` is
    finished meanwhile)."""
    global cond_waiters
    with _shared_cond:
        if fut is None or fut._state != _FINISHED:
            cond_waiters += 1
            try:
                _shared_cond.wait(ms / 1000.0)
            finally:
                cond_waiters -= 1
    return 0
import array as _array
_no_lat = _array.array("q", [0])        # lat_ns when none is given


cdef inline int list_done(cxl_req *r, const uint64_t[::1] c, int64_t[::1] st,
                          int[::1] cd, int64_t[::1] lat, bint timed,
                          bint redrive) noexcept nogil:
    """Record a list request's outcome; 1 if it failed with IO_IN_ERROR."""
    cdef Py_ssize_t k = <Py_ssize_t> r.index
    cdef int64_t s = list_status(r.status, c[k])
    st[k] = s
    cd[k] = r.afu_rc if s == IO_AFU_ERROR else 0
    if timed:
        if redrive:
            lat[k] += cxl_now_ns() - r.t_submit
        else:
            lat[k] = cxl_now_ns() - r.t_submit
    return s == IO_IN_ERROR


cdef Py_ssize_t run_list(cxl_engine *eng, DataPath dp, const uint8_t[::1] o,
                         const uint64_t[::1] l, const uint64_t[::1] c,
                         const uint64_t[::1] off, char *buf, uint64_t buflen,
                         int64_t[::1] st, int[::1] cd, int64_t[::1] lat,
                         bint timed, Py_ssize_t qd, bint redrive) noexcept nogil:
    """Run a list's requests (with ``redrive``: only those that failed
    with IO_IN_ERROR) ``qd`` at a time: the number that failed with IO_IN_ERROR, or
    -1 without memory."""
    cdef Py_ssize_t n = o.shape[0], i = 0, outstanding = 0, nreset = 0
    cdef cxl_slots sl
    cdef cxl_req *r
    cdef cxl_req *nxt
    cdef uint64_t bs = dp.block_size, limit = dp._limit, lba, nb
    cdef int op
    if cxl_slots_init(&sl, qd if qd < n else n) != 0:
        return -1
    while i < n or outstanding:
        while i < n and sl.nfree:
            if redrive and st[i] != IO_IN_ERROR:
                i += 1
                continue
            op = o[i]
            lba = l[i]
            nb = c[i]
            cd[i] = 0
            # the checks of DataPath._list_one, before the engine sees it
            if op < 1 or op > 3 or (nb and nb - 1 > NO_LIMIT - lba):
                st[i] = -EINVAL
            elif limit != NO_LIMIT and (lba > limit or nb > limit - lba):
                st[i] = IO_BEYOND_SIZE
            elif op != 3 and (off[i] > buflen or nb > (buflen - off[i]) // bs):
                st[i] = -EINVAL
            else:
                r = cxl_slots_get(&sl)
                r.index = <uint64_t> i
                if timed:                   # prepare may run the I/O
                    r.t_submit = cxl_now_ns()
                prepare(r, dp, eng, CXL_OP_ZERO if op == 3 else op, lba, nb,
                        NULL if op == 3 else buf + off[i])
                # (started at once: on a device that keeps more requests
                # in flight than one kick per batch does)
                if cxl_engine_submit_flags(eng, r, 0):
                    # done at submission (page cache, memory, a refusal)
                    nreset += list_done(r, c, st, cd, lat, timed, redrive)
                    cxl_slots_put(&sl, r)
                else:
                    outstanding += 1
            i += 1
        if outstanding == 0:
            continue
        cxl_engine_wait_queue(eng, &sl.q)
        r = cxl_queue_take(&sl.q)
        while r != NULL:
            nxt = r.qnext
            nreset += list_done(r, c, st, cd, lat, timed, redrive)
            cxl_slots_put(&sl, r)
            outstanding -= 1
            r = nxt
    cxl_slots_destroy(&sl)
    return nreset


cdef inline int64_t raw_done(cxl_req *r, int64_t[::1] st, int64_t[::1] lat,
                             bint timed, int64_t bad) noexcept nogil:
    """Record a raw request's outcome; the first failed index so far."""
    cdef Py_ssize_t k = <Py_ssize_t> r.index
    st[k] = r.status                # an errno, or XFER_BACKING_ENDED
    if timed:
        lat[k] = cxl_now_ns() - r.t_submit
    if r.status and (bad < 0 or k < bad):
        return k
    return bad


cdef int64_t run_raw(cxl_engine *eng, int fd, const uint64_t[::1] o,
                     const uint64_t[::1] off, uint64_t nb, const uint64_t[::1] boff,
                     char *buf, int64_t[::1] st, int64_t[::1] lat, bint timed,
                     Py_ssize_t qd) noexcept nogil:
    """raw_listio's loop: the index of the first failed request, -1 when
    all succeeded, -2 without memory."""
    cdef Py_ssize_t n = o.shape[0], i = 0, outstanding = 0
    cdef cxl_slots sl
    cdef cxl_req *r
    cdef cxl_req *nxt
    cdef int64_t bad = -1
    cdef int cap
    cdef int nowait = cxl_fd_nowait_class(fd)
    cdef cxl_store *store = store_of(fd)
    if cxl_slots_init(&sl, qd if qd < n else n) != 0:
        return -2
    while i < n or outstanding:
        while i < n and sl.nfree:
            r = cxl_slots_get(&sl)
            r.index = <uint64_t> i
            r.op = <int> o[i]
            cap = CXL_SEG_INLINE
            cxl_req_reserve(r, cap)
            add_run(r, &cap, <int> o[i], fd, 2, nowait, off[i], nb, buf + boff[i])
            r.segs[0].req = r
            r.segs[0].io.tag = &r.segs[0]
            r.segs[0].io.target.obj = store
            if timed:
                r.t_submit = cxl_now_ns()
            r.seg_left = cxl_engine_try_segs(eng, r)
            if cxl_engine_submit_flags(eng, r, 0):
                bad = raw_done(r, st, lat, timed, bad)      # done at submission
                cxl_slots_put(&sl, r)
            else:
                outstanding += 1
            i += 1
        if outstanding == 0:
            continue
        cxl_engine_wait_queue(eng, &sl.q)
        r = cxl_queue_take(&sl.q)
        while r != NULL:
            nxt = r.qnext
            bad = raw_done(r, st, lat, timed, bad)
            cxl_slots_put(&sl, r)
            outstanding -= 1
            r = nxt
    cxl_slots_destroy(&sl)
    return bad
