"""One context's resource handle table (RHT) and its LXTs (spec §2.5, §2.6).

A handle is a slot of the RHT.  A virtual slot (format 0, ``nmask`` 16)
owns an LXT: one 64-bit entry per chunk of the vLUN,
``(aun << 16) | (lun_index << 8) | (perms << 4) | port_sel``.  A direct slot
(format 1) names the whole physical LUN and passes LBAs through.

Translation follows the AFU (spec §19): handle bounds (0x03), slot open
(0x01), RHT permission (0x05), chunk bounds (0x13), LXT permission (0x15),
then ``plba = (entry & ~0xFFFF) | (vlba & 0xFFFF)``.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, malloc, realloc, free
from libc.string cimport memcpy, memset
from cxlflash._core.allocator cimport ChunkAllocator
from cxlflash._core.includes.system cimport (
    posix_memalign, madvise, MADV_HUGEPAGE, pthread_mutex_t, pthread_mutex_init,
    pthread_mutex_lock, pthread_mutex_unlock)
from cxlflash._core.includes.system cimport (
    pthread_rwlock_init, pthread_rwlock_destroy, pthread_rwlock_rdlock,
    pthread_rwlock_wrlock, pthread_rwlock_unlock, pthread_rwlockattr_t,
    pthread_rwlockattr_init, pthread_rwlockattr_setkind_np,
    pthread_rwlockattr_destroy, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)

import errno
import numpy as np
from cxlflash._core.errors import afu_error, AfuError

ctypedef fused lba_t:
    int64_t
    uint64_t

DEF CHUNK_MASK = 0xFFFF
MAX_RHT_SIZE = 4096


cdef inline uint32_t lxt_groups(uint64_t n) noexcept nogil:
    return <uint32_t> ((n + LXT_GROUP_SIZE - 1) // LXT_GROUP_SIZE)


# -- LXT memory ---------------------------------------------------------------
# Large LXTs (>= 256 KiB, 32 k chunks) come from a few kept for reuse, as a
# fresh one would cost a page fault per 4 KiB on every clone, open or
# regrowth; from 4 MiB (512 k chunks) on they are also 2 MiB-aligned and
# advised onto huge pages.

DEF BIG_LXT = 262144
DEF HUGE_LXT = 4194304
DEF LXT_CACHE_SLOTS = 4
cdef void *lxt_cache[LXT_CACHE_SLOTS]
cdef uint64_t lxt_cache_cap[LXT_CACHE_SLOTS]
cdef pthread_mutex_t lxt_cache_mutex
pthread_mutex_init(&lxt_cache_mutex, NULL)


cdef uint64_t *lxt_alloc(uint64_t entries) noexcept nogil:
    """Memory for an LXT of ``entries`` entries (uninitialised), or NULL."""
    cdef size_t nbytes = entries * sizeof(uint64_t)
    cdef void *p = NULL
    cdef int i
    if nbytes < BIG_LXT:
        return <uint64_t *> malloc(nbytes)
    pthread_mutex_lock(&lxt_cache_mutex)
    for i in range(LXT_CACHE_SLOTS):
        if lxt_cache[i] != NULL and lxt_cache_cap[i] == entries:
            p = lxt_cache[i]
            lxt_cache[i] = NULL
            break
    pthread_mutex_unlock(&lxt_cache_mutex)
    if p != NULL:
        return <uint64_t *> p
    if nbytes < HUGE_LXT:
        return <uint64_t *> malloc(nbytes)
    if posix_memalign(&p, 2097152, nbytes) != 0:
        return NULL
    madvise(p, nbytes, MADV_HUGEPAGE)
    return <uint64_t *> p


cdef void lxt_free(uint64_t *lxt, uint64_t entries) noexcept nogil:
    """Free an LXT from lxt_alloc (a large one may be kept for reuse)."""
    cdef int i
    if lxt == NULL:
        return
    if entries * sizeof(uint64_t) >= BIG_LXT:
        pthread_mutex_lock(&lxt_cache_mutex)
        for i in range(LXT_CACHE_SLOTS):
            if lxt_cache[i] == NULL:
                lxt_cache[i] = lxt
                lxt_cache_cap[i] = entries
                lxt = NULL
                break
        pthread_mutex_unlock(&lxt_cache_mutex)
    free(lxt)


cdef class ResourceTable:
    """ResourceTable(rht_size=256)

    The RHT of one context: ``rht_size`` handles, 0..rht_size-1.
    """

    def __cinit__(self, uint32_t rht_size=256):
        if rht_size < 1 or rht_size > MAX_RHT_SIZE:
            raise ValueError(
                f"rht_size must be 1..{MAX_RHT_SIZE} (the kernel has 256 with "
                f"4 KiB pages and 4096 with 64 KiB pages), got {rht_size}")
        self.rht = <rht_entry *> calloc(rht_size, sizeof(rht_entry))
        if self.rht == NULL:
            raise MemoryError("cannot allocate the resource handle table")
        self.rht_size = rht_size
        self.rht_out = 0
        self.state = TABLE_LIVE
        cdef pthread_rwlockattr_t attr
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(
            &attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.rwlock, &attr)
        pthread_rwlockattr_destroy(&attr)

    def __dealloc__(self):
        cdef uint32_t i
        if self.rht != NULL:
            for i in range(self.rht_size):
                lxt_free(self.rht[i].lxt, self.rht[i].lxt_cap)
            free(self.rht)
        pthread_rwlock_destroy(&self.rwlock)

    # -- the cdef interface ---------------------------------------------------

    cdef void read_lock(self) noexcept nogil:
        pthread_rwlock_rdlock(&self.rwlock)

    cdef void write_lock(self) noexcept nogil:
        pthread_rwlock_wrlock(&self.rwlock)

    cdef void unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.rwlock)

    cdef void _write_begin(self):
        """Take the write lock -- waiting for I/O in flight without the GIL
        -- and return with the GIL held.  Every change to the table is made
        holding both, so code that holds the GIL may read it unlocked."""
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)

    cdef int lookup(self, uint32_t handle, int write) noexcept nogil:
        cdef rht_entry *e
        if handle >= self.rht_size:
            return AFU_RC_RHT_OUT_OF_BOUNDS
        e = &self.rht[handle]
        if e.nmask == 0 or ((e.fp >> 4) == RHT_FMT_DIRECT and not e.valid):
            return AFU_RC_RHT_INVALID
        if not (e.fp & (RHT_PERM_WRITE if write else RHT_PERM_READ)):
            return AFU_RC_RHT_RW_PERM
        return AFU_RC_OK

    cdef int64_t translate_one(self, uint32_t handle, uint64_t vlba,
                               int write, int *afu_rc) noexcept nogil:
        cdef rht_entry *e = &self.rht[handle]
        cdef uint64_t chunk, entry
        if (e.fp >> 4) == RHT_FMT_DIRECT:
            if vlba > e.last_lba:
                afu_rc[0] = SCSI_LBA_OUT_OF_RANGE
                return -1
            return <int64_t> vlba
        chunk = vlba >> MC_CHUNK_SHIFT
        if chunk >= e.lxt_cnt:
            afu_rc[0] = AFU_RC_LXT_OUT_OF_BOUNDS
            return -1
        entry = e.lxt[chunk]
        if not ((entry >> LXT_PERM_SHIFT) & (RHT_PERM_WRITE if write else RHT_PERM_READ)):
            afu_rc[0] = AFU_RC_LXT_RW_PERM
            return -1
        return <int64_t> ((entry & ~(<uint64_t> CHUNK_MASK)) | (vlba & CHUNK_MASK))

    cdef uint64_t extent(self, uint32_t handle) noexcept nogil:
        cdef rht_entry *e = &self.rht[handle]
        if (e.fp >> 4) == RHT_FMT_DIRECT:
            return e.last_lba + 1
        return (<uint64_t> e.lxt_cnt) << MC_CHUNK_SHIFT

    # -- helpers ----------------------------------------------------------------

    cdef rht_entry *_entry(self, uint32_t handle, bint want_open=True) except NULL:
        if handle >= self.rht_size:
            raise IndexError(
                f"resource handle {handle} is out of range (0..{self.rht_size - 1})")
        if want_open and self.rht[handle].nmask == 0:
            raise ValueError(f"resource handle {handle} is not open")
        return &self.rht[handle]

    cdef rht_entry *_virtual(self, uint32_t handle) except NULL:
        cdef rht_entry *e = self._entry(handle)
        if (e.fp >> 4) != RHT_FMT_VIRTUAL:
            raise ValueError(f"resource handle {handle} is a direct handle, not a virtual LUN")
        return e

    cdef int _checkout(self) except -1:
        cdef uint32_t i
        for i in range(self.rht_size):
            if self.rht[i].nmask == 0:
                return i
        raise OSError(errno.EMFILE,
                      f"all {self.rht_size} resource handles of this context are open")

    cdef int _set_lxt_capacity(self, rht_entry *e, uint64_t n) noexcept nogil:
        """Reallocate ``e.lxt`` when the number of 8-entry groups changes.

        Returns -1, changing nothing, when memory runs out.  Called with the
        write lock held, so it must not take the GIL.
        """
        cdef uint64_t cap = <uint64_t> lxt_groups(n) * LXT_GROUP_SIZE
        cdef uint64_t *p
        if cap == e.lxt_cap:
            return 0
        if cap == 0:
            lxt_free(e.lxt, e.lxt_cap)
            e.lxt = NULL
            e.lxt_cap = 0
            return 0
        if cap * sizeof(uint64_t) < BIG_LXT and e.lxt_cap * sizeof(uint64_t) < BIG_LXT:
            p = <uint64_t *> realloc(e.lxt, cap * sizeof(uint64_t))
            if p == NULL:
                return -1
        else:
            p = lxt_alloc(cap)
            if p == NULL:
                return -1
            if e.lxt != NULL:
                memcpy(p, e.lxt, (cap if cap < e.lxt_cap else e.lxt_cap) * sizeof(uint64_t))
                lxt_free(e.lxt, e.lxt_cap)
        if cap > e.lxt_cap:
            memset(p + e.lxt_cap, 0, (cap - e.lxt_cap) * sizeof(uint64_t))
        e.lxt = p
        e.lxt_cap = <uint32_t> cap
        return 0

    # -- opening and closing handles ------------------------------------------------

    def open_virtual(self, int perms):
        """Check out the lowest free handle as an empty virtual LUN.

        ``perms``: RHT permission bits (1 read, 2 write, 3 both).  Raises
        ``OSError(EMFILE)`` when every handle is open.
        """
        cdef int h = self._checkout()
        cdef rht_entry *e = &self.rht[h]
        self._write_begin()
        memset(e, 0, sizeof(rht_entry))
        e.fp = (RHT_FMT_VIRTUAL << 4) | (perms & 3)
        e.nmask = MC_RHT_NMASK
        self.rht_out += 1
        self.unlock()
        return h

    def open_direct(self, int perms, uint64_t lun_id, int port_sel,
                    uint64_t last_lba):
        """Check out the lowest free handle as a direct (physical) handle.

        ``last_lba`` is the LUN's last native LBA; LBAs beyond it are
        refused.  Raises ``OSError(EMFILE)`` when every handle is open.
        """
        if not 0 < port_sel <= 0xF:
            raise ValueError(f"port_sel must be a nonzero 4-bit port mask, got {port_sel}")
        cdef int h = self._checkout()
        cdef rht_entry *e = &self.rht[h]
        self._write_begin()
        memset(e, 0, sizeof(rht_entry))
        e.lun_id = lun_id
        e.last_lba = last_lba
        e.valid = DIRECT_VALID
        e.fp = (RHT_FMT_DIRECT << 4) | (perms & 3)
        e.nmask = <uint8_t> port_sel
        self.rht_out += 1
        self.unlock()
        return h

    def close(self, uint32_t handle):
        """Check the handle in, clearing the whole entry.

        Returns the chunks the handle still mapped (normally none: callers
        shrink a vLUN to 0 first) so the caller can free them.
        """
        cdef rht_entry *e = self._entry(handle)
        auns = self._auns(e, 0, e.lxt_cnt)
        self._write_begin()
        lxt_free(e.lxt, e.lxt_cap)
        memset(e, 0, sizeof(rht_entry))
        self.rht_out -= 1
        self.unlock()
        return auns

    cdef object _auns(self, rht_entry *e, uint64_t start, uint64_t stop):
        """The chunk numbers of LXT entries [start, stop), in order."""
        out = np.empty(stop - start, dtype=np.int64)
        cdef int64_t[::1] v = out
        cdef uint64_t i
        with nogil:
            for i in range(start, stop):
                v[i - start] = <int64_t> (e.lxt[i] >> MC_CHUNK_SHIFT)
        return out

    # -- growing and shrinking a vLUN ------------------------------------------------

    def grow(self, uint32_t handle, auns, int lun_index, int port_sel):
        """Append chunks ``auns`` (in order) at the tail of a vLUN.

        Each LXT entry is written as the driver does, with RW permissions.
        """
        cdef const int64_t[::1] a = np.ascontiguousarray(auns, dtype=np.int64).reshape(-1)
        cdef rht_entry *e = self._virtual(handle)
        cdef uint64_t old = e.lxt_cnt, n = a.shape[0], i
        cdef uint64_t low = ((<uint64_t> (lun_index & 0xFF)) << LXT_LUNIDX_SHIFT) \
            | (RHT_PERM_RW << LXT_PERM_SHIFT) | (port_sel & 0xF)
        if old + n > 0xFFFFFFFF:
            raise OverflowError("a vLUN holds at most 2**32 - 1 chunks")
        if n == 0:
            return
        cdef int rc
        self._write_begin()
        rc = self._set_lxt_capacity(e, old + n)
        if rc == 0:
            for i in range(n):
                e.lxt[old + i] = ((<uint64_t> a[i]) << MC_CHUNK_SHIFT) | low
            e.lxt_cnt = <uint32_t> (old + n)
        self.unlock()
        if rc != 0:
            raise MemoryError(f"cannot allocate an LXT of {old + n} entries")

    def grow_from(self, uint32_t handle, ChunkAllocator allocator not None,
                  uint64_t n, int lun_index, int port_sel):
        """Grow a vLUN by up to ``n`` chunks taken straight from
        ``allocator`` into the LXT (the kernel's grow loop, spec §11.3):
        fewer when fewer are free.  Returns the number of chunks added; 0
        changes nothing.  Raises MemoryError when the LXT cannot grow."""
        cdef rht_entry *e = self._virtual(handle)
        cdef uint64_t old = e.lxt_cnt, k = 0, i
        cdef uint64_t low = ((<uint64_t> (lun_index & 0xFF)) << LXT_LUNIDX_SHIFT) \
            | (RHT_PERM_RW << LXT_PERM_SHIFT) | (port_sel & 0xF)
        cdef int rc = 0
        if n > 0xFFFFFFFF - old:
            n = 0xFFFFFFFF - old
        self._write_begin()
        with nogil:
            allocator.lock()
            k = n if <uint64_t> allocator.free_aun_cnt >= n else <uint64_t> allocator.free_aun_cnt
            if k:
                rc = self._set_lxt_capacity(e, old + k)
                if rc == 0:
                    for i in range(k):
                        e.lxt[old + i] = ((<uint64_t> allocator.ba_alloc()) << MC_CHUNK_SHIFT) | low
                    e.lxt_cnt = <uint32_t> (old + k)
            allocator.unlock()
        self.unlock()
        if rc != 0:
            raise MemoryError(f"cannot allocate an LXT of {old + k} entries")
        return k

    def shrink(self, uint32_t handle, uint64_t new_count):
        """Cut a vLUN to ``new_count`` chunks.

        Returns the removed chunk numbers in the order the kernel frees them:
        the last chunk first.
        """
        cdef rht_entry *e = self._virtual(handle)
        cdef uint64_t old = e.lxt_cnt, i, n
        if new_count > old:
            raise ValueError(f"cannot shrink handle {handle} from {old} to {new_count} chunks")
        n = old - new_count
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] v = out
        self._write_begin()
        for i in range(n):
            v[i] = <int64_t> (e.lxt[old - 1 - i] >> MC_CHUNK_SHIFT)
        e.lxt_cnt = <uint32_t> new_count
        # A smaller LXT that cannot be had keeps the larger one.
        self._set_lxt_capacity(e, new_count)
        self.unlock()
        return out

    # -- translation -----------------------------------------------------------------

    def translate(self, uint32_t handle, uint64_t vlba, bint write=False):
        """Translate one LBA as the AFU would; raises :class:`AfuError`."""
        # No lock: the GIL is held, and the table only changes under it.
        cdef int64_t plba = -1
        cdef int rc = self.lookup(handle, write)
        if rc == AFU_RC_OK:
            plba = self.translate_one(handle, vlba, write, &rc)
        # Test the code, not the sign: a direct LBA >= 2**63 is valid.
        if rc != AFU_RC_OK:
            raise afu_error(rc, handle, vlba, write=write,
                            extent=self.extent(handle) if handle < self.rht_size else None)
        return <uint64_t> plba

    def translate_many(self, uint32_t handle, const lba_t[::1] vlbas, out=None,
                       bint write=False):
        """Translate an array of LBAs without the GIL.

        ``vlbas`` is a contiguous int64 or uint64 array; the physical LBAs go
        to ``out`` (a uint64 array of the same length, allocated when None),
        which is returned.  The first refused LBA raises :class:`AfuError`
        with ``index`` set to its position and ``afu_rc`` to the code.
        """
        cdef Py_ssize_t n = vlbas.shape[0]
        if out is None:
            out = np.empty(n, dtype=np.uint64)
        elif not (isinstance(out, np.ndarray) and out.dtype == np.uint64
                  and out.shape == (n,)):
            raise TypeError(f"out must be a uint64 array of shape ({n},)")
        cdef uint64_t[::1] o = out
        cdef Py_ssize_t i, bad = -1
        cdef int rc = AFU_RC_OK
        cdef rht_entry *e
        cdef uint64_t v, chunk, entry, cnt, need, last
        cdef uint64_t *lxt
        cdef bint all_ok
        with nogil:
            self.read_lock()
            rc = self.lookup(handle, write)
            if rc != AFU_RC_OK:
                bad = 0 if n else -1
            else:
                e = &self.rht[handle]
                need = RHT_PERM_WRITE if write else RHT_PERM_READ
                if (e.fp >> 4) == RHT_FMT_DIRECT:
                    last = e.last_lba
                    for i in range(n):
                        v = <uint64_t> vlbas[i]
                        if v > last:
                            rc = SCSI_LBA_OUT_OF_RANGE
                            bad = i
                            break
                        o[i] = v
                else:
                    cnt = e.lxt_cnt
                    lxt = e.lxt
                    # The LXT permissions are checked once per entry up front
                    # when the LXT is no longer than the batch; then the loop
                    # checks only the bounds.
                    all_ok = cnt <= <uint64_t> n
                    if all_ok:
                        for i in range(<Py_ssize_t> cnt):
                            if not ((lxt[i] >> LXT_PERM_SHIFT) & need):
                                all_ok = False
                                break
                    if all_ok:
                        for i in range(n):
                            v = <uint64_t> vlbas[i]
                            chunk = v >> MC_CHUNK_SHIFT
                            if chunk >= cnt:
                                rc = AFU_RC_LXT_OUT_OF_BOUNDS
                                bad = i
                                break
                            o[i] = (lxt[chunk] & ~(<uint64_t> CHUNK_MASK)) | (v & CHUNK_MASK)
                    else:
                        for i in range(n):
                            v = <uint64_t> vlbas[i]
                            chunk = v >> MC_CHUNK_SHIFT
                            if chunk >= cnt:
                                rc = AFU_RC_LXT_OUT_OF_BOUNDS
                                bad = i
                                break
                            entry = lxt[chunk]
                            if not ((entry >> LXT_PERM_SHIFT) & need):
                                rc = AFU_RC_LXT_RW_PERM
                                bad = i
                                break
                            o[i] = (entry & ~(<uint64_t> CHUNK_MASK)) | (v & CHUNK_MASK)
            self.unlock()
        if bad >= 0:
            raise afu_error(rc, handle, int(vlbas[bad]), index=bad, write=write,
                            extent=self.extent(handle) if handle < self.rht_size else None)
        return out

    # -- clone -------------------------------------------------------------------------

    def clone_slot(self, ResourceTable src not None, uint32_t handle, int perms,
                   ChunkAllocator allocator=None):
        """Copy ``src``'s open entry ``handle`` into this (free) slot.

        Permissions become src ∩ ``perms``; the LXT is copied verbatim.
        Returns the chunk numbers whose clone counts the caller must raise
        (empty for a direct entry).  With ``allocator``, their clone counts
        are raised here, in the same pass, all or none, and an empty array
        is returned; when one cannot be (a chunk not allocated, or already
        at 255 clones) ``OSError(EIO)`` is raised and nothing changes.
        """
        if src is self:
            raise ValueError("cannot clone a table into itself")
        cdef rht_entry *s = src._entry(handle)
        cdef rht_entry *d = self._entry(handle, False)
        if d.nmask != 0:
            raise ValueError(f"resource handle {handle} of the destination is open")
        # The source only changes under the GIL, which we hold.
        cdef uint64_t cnt = s.lxt_cnt
        cdef uint64_t *lxt = NULL
        cdef int rc = 0
        if cnt:
            lxt = lxt_alloc(<uint64_t> lxt_groups(cnt) * LXT_GROUP_SIZE)
            if lxt == NULL:
                raise MemoryError(f"cannot allocate an LXT of {cnt} entries")
            with nogil:
                memset(lxt + cnt, 0, (lxt_groups(cnt) * LXT_GROUP_SIZE - cnt)
                       * sizeof(uint64_t))
                if allocator is None:
                    memcpy(lxt, s.lxt, cnt * sizeof(uint64_t))
                else:
                    # One pass: the copy raises the clone counts as it goes.
                    allocator.lock()
                    rc = allocator.clone_lxt(s.lxt, lxt, cnt)
                    allocator.unlock()
            if rc:
                lxt_free(lxt, <uint64_t> lxt_groups(cnt) * LXT_GROUP_SIZE)
                raise OSError(errno.EIO, f"cannot clone handle {handle}: a chunk is "
                              "not allocated or already has 255 clones")
        self._write_begin()
        memcpy(d, s, sizeof(rht_entry))
        d.fp = s.fp & (0xFC | (perms & 3))
        d.lxt = lxt
        d.lxt_cap = lxt_groups(cnt) * LXT_GROUP_SIZE
        self.rht_out += 1
        self.unlock()
        if allocator is not None:
            return np.empty(0, dtype=np.int64)
        return self._auns(d, 0, cnt)

    def clone_from(self, ResourceTable src not None, int perms,
                   ChunkAllocator allocator=None):
        """Copy every open entry of ``src`` (handle numbers kept).

        Returns ``[(handle, auns), ...]``: for each copied handle, the chunks
        whose clone counts the caller must raise -- or, with ``allocator``,
        raises them here (see :meth:`clone_slot`; a failure undoes the
        handles already copied).  This table must have no open handle.
        """
        if self.rht_out:
            raise ValueError("the destination table has open handles")
        if src.rht_size > self.rht_size:
            raise ValueError("the source table is larger than the destination")
        done = []
        try:
            for h in src.open_handles():
                done.append((h, self.clone_slot(src, h, perms, allocator)))
        except BaseException:
            for h, _ in done:
                if allocator is not None and self.is_virtual(h):
                    allocator.free_many(self.chunks(h))
                self.close(h)
            raise
        return done

    def load_slot(self, uint32_t handle, int fmt, int perms, int nmask, lxt=None,
                  uint64_t lun_id=0, uint64_t last_lba=0, int valid=0,
                  bint replace=False):
        """Set a slot from a snapshot of another table's entry (what
        :meth:`entry` and :meth:`lxt` report): for a replica of a table
        kept in another process.  The LXT is copied verbatim.  The slot
        must be free, unless ``replace``: then an open slot is swapped in
        one step (I/O in flight finishes first)."""
        cdef rht_entry *e = self._entry(handle, False)
        cdef bint was_open = e.nmask != 0
        if was_open and not replace:
            raise ValueError(f"resource handle {handle} is open")
        if nmask <= 0 or nmask > 0xFF or fmt not in (RHT_FMT_VIRTUAL, RHT_FMT_DIRECT):
            raise ValueError("not an open entry (format 0 or 1, nmask 1..255)")
        cdef const uint64_t[::1] src
        cdef uint64_t cnt = 0, cap = 0
        cdef uint64_t *p = NULL
        if fmt == RHT_FMT_VIRTUAL and lxt is not None and len(lxt):
            src = np.ascontiguousarray(lxt, dtype=np.uint64).reshape(-1)
            cnt = src.shape[0]
            if cnt > 0xFFFFFFFF:
                raise OverflowError("a vLUN holds at most 2**32 - 1 chunks")
            cap = <uint64_t> lxt_groups(cnt) * LXT_GROUP_SIZE
            p = lxt_alloc(cap)
            if p == NULL:
                raise MemoryError(f"cannot allocate an LXT of {cnt} entries")
            memcpy(p, &src[0], cnt * sizeof(uint64_t))
            memset(p + cnt, 0, (cap - cnt) * sizeof(uint64_t))
        self._write_begin()
        if was_open:
            lxt_free(e.lxt, e.lxt_cap)
        memset(e, 0, sizeof(rht_entry))
        e.fp = <uint8_t> ((fmt << 4) | (perms & 3))
        e.nmask = <uint8_t> nmask
        e.lxt = p
        e.lxt_cnt = <uint32_t> cnt
        e.lxt_cap = <uint32_t> cap
        e.lun_id = lun_id
        e.last_lba = last_lba
        e.valid = <uint8_t> valid
        if not was_open:
            self.rht_out += 1
        self.unlock()

    def watch_epoch(self, buffer, uint64_t seen):
        """Follow the reset epoch at the start of ``buffer`` (8 bytes of
        shared memory): while it differs from ``seen`` the data path finds
        the table in error."""
        cdef const unsigned char[::1] view = memoryview(buffer).cast("B")
        if view.shape[0] < 8 or (<size_t> &view[0]) % 8:
            raise ValueError("the epoch needs 8 aligned bytes")
        self.epoch_buffer = view
        self.epoch_word = <const uint64_t *> &view[0]
        self.epoch_seen = seen

    # -- introspection -------------------------------------------------------------------

    def open_handles(self):
        """The open handles, ascending."""
        cdef uint32_t i
        return [i for i in range(self.rht_size) if self.rht[i].nmask != 0]

    def is_open(self, uint32_t handle):
        return self._entry(handle, False).nmask != 0

    def is_virtual(self, uint32_t handle):
        return (self._entry(handle).fp >> 4) == RHT_FMT_VIRTUAL

    def perms(self, uint32_t handle):
        """The RHT permission bits of an open handle."""
        return self._entry(handle).fp & 3

    def lxt_count(self, uint32_t handle):
        """The vLUN size in chunks (``lxt_cnt``)."""
        return self._virtual(handle).lxt_cnt

    def lxt_capacity(self, uint32_t handle):
        """Entries allocated for the LXT (a multiple of 8)."""
        return self._virtual(handle).lxt_cap

    def lxt(self, uint32_t handle):
        """A copy of the LXT as a uint64 array."""
        cdef rht_entry *e = self._virtual(handle)
        out = np.empty(e.lxt_cnt, dtype=np.uint64)
        cdef uint64_t[::1] v = out
        if e.lxt_cnt:
            memcpy(&v[0], e.lxt, e.lxt_cnt * sizeof(uint64_t))
        return out

    def chunks(self, uint32_t handle):
        """The chunk numbers of a vLUN, in virtual order (int64 array)."""
        cdef rht_entry *e = self._virtual(handle)
        return self._auns(e, 0, e.lxt_cnt)

    def blocks(self, uint32_t handle):
        """Native blocks addressable through the handle."""
        self._entry(handle)
        return self.extent(handle)

    def entry(self, uint32_t handle):
        """The RHT entry as a dict (for tools and tests)."""
        cdef rht_entry *e = self._entry(handle, False)
        if e.nmask == 0:
            return {"handle": handle, "open": False}
        if (e.fp >> 4) == RHT_FMT_DIRECT:
            return {"handle": handle, "open": True, "format": 1,
                    "perms": e.fp & 3, "lun_id": e.lun_id, "valid": e.valid,
                    "port_sel": e.nmask, "last_lba": e.last_lba}
        return {"handle": handle, "open": True, "format": 0,
                "perms": e.fp & 3, "nmask": e.nmask, "lxt_cnt": e.lxt_cnt}

    def __repr__(self):
        return f"ResourceTable(rht_size={self.rht_size}, open={self.rht_out})"
