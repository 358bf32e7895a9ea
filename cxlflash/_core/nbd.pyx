"""The NBD transmission phase: requests in, replies out, without the GIL.

The handshake (option haggling) is Python (``cxlflash.server.nbd``); once
an export is chosen, its connection is served here.  Each connection is
served by N worker threads (Python threads that release the GIL for good):
a worker takes the receive lock, reads one request header (and a WRITE's
payload, straight into its own aligned buffer), lets the lock go, runs the
request through the export's data path (translation, range and permission
checks under the table's read lock, pread/pwrite on the backing store) and
sends the reply -- header and payload in one ``sendmsg`` under the send
lock.  So up to N requests of a connection are in flight, and replies go
out in the order requests finish, as the protocol allows.

Every field of a request is checked before anything is done: the magic
(else the connection closes), the command flags, the range against the
size the client was told (overflow-safe), the length against the 32 MiB
maximum (a longer WRITE closes the connection: its payload cannot be
skipped safely).  Requests need not be block aligned: partial blocks are
read-modify-written under a per-export lock.
"""
from libc.errno cimport (errno, EINTR, EINVAL, ENOMEM, ENOSPC, EDQUOT, EFBIG, EPERM,
                         EACCES, EROFS, ENXIO)
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset, strlen
from posix.types cimport off_t
from cxlflash._core.includes.system cimport (
    iovec, msghdr, sendmsg, recv, shutdown, MSG_NOSIGNAL, SHUT_RDWR, lseek,
    fdatasync, SEEK_DATA, SEEK_HOLE, posix_memalign, htobe64, be64toh, htobe32,
    be32toh, htobe16, be16toh)
from cxlflash._core.store cimport cxl_store, store_of
from cxlflash._core.datapath cimport (
    DataPath, chunk_step, XFER_IN_ERROR, XFER_AFU_ERROR, XFER_BEYOND_OFF_T,
    ZERO_WRITE)
from cxlflash._core.tables cimport ResourceTable, RHT_FMT_DIRECT
from cxlflash._core.locks cimport (lock_init, lock_destroy, cxl_mutex_lock,
                                   cxl_mutex_unlock, cxl_rdlock, cxl_wrlock, cxl_unlock,
                                   CXL_LOCK_MUTEX, CXL_LOCK_RW)

import errno as _errno
import os

MAX_PAYLOAD = NBD_MAX_PAYLOAD
HOLE_READ_MIN = NBD_HOLE_READ_MIN

cdef enum:
    REQUEST_SIZE = 28
    SIMPLE_SIZE = 16
    CHUNK_SIZE = 20              # structured reply chunk header
    ZERO_GRANULE = 4096          # READ replies: zero runs found per 4 KiB


cdef extern from *:
    """
    #define CXLFLASH_ATOMIC_INC(p) __atomic_add_fetch((p), 1, __ATOMIC_SEQ_CST)
    """
    void atomic_inc "CXLFLASH_ATOMIC_INC"(uint64_t *p) noexcept nogil


# -- big-endian fields ---------------------------------------------------------------

cdef inline void put16(char *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)

cdef inline void put32(char *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)

cdef inline void put64(char *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)

cdef inline uint16_t get16(const char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)

cdef inline uint32_t get32(const char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)

cdef inline uint64_t get64(const char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef inline int wire_error(int rc) noexcept nogil:
    """An errno or XFER_* code as the NBD error sent for it."""
    if rc == XFER_BEYOND_OFF_T or rc == EINVAL:
        return NBD_EINVAL
    if rc < 0:
        return NBD_EIO
    if rc == ENOSPC or rc == EDQUOT or rc == EFBIG:
        return NBD_ENOSPC
    if rc == EPERM or rc == EACCES or rc == EROFS:
        return NBD_EPERM
    if rc == ENOMEM:
        return NBD_ENOMEM
    return NBD_EIO


cdef inline uint16_t allowed_flags(uint16_t typ) noexcept nogil:
    """The command flags doc/proto.md documents for a command (FUA on all)."""
    if typ == NBD_CMD_READ:
        return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF
    if typ == NBD_CMD_WRITE_ZEROES:
        return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
    if typ == NBD_CMD_BLOCK_STATUS:
        return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE
    return NBD_CMD_FLAG_FUA


cdef int recv_full(int fd, char *buf, uint64_t n) noexcept nogil:
    """0, or -1 at end of stream or on an error."""
    cdef ssize_t r
    while n:
        r = recv(fd, buf, n, 0)
        if r > 0:
            buf += r
            n -= <uint64_t> r
        elif r == 0 or errno != EINTR:
            return -1
    return 0


cdef int grow(worker *w, uint64_t need) noexcept nogil:
    """Make the worker's payload buffer hold ``need`` bytes: 0, or -1."""
    cdef void *p = NULL
    cdef uint64_t cap
    if need <= w.cap:
        return 0
    cap = (need + 65535) & ~(<uint64_t> 65535)
    if posix_memalign(&p, 4096, cap) != 0:
        return -1
    free(w.buf)
    w.buf = <char *> p
    w.cap = cap
    return 0


cdef class NbdExport:
    """NbdExport(lun)

    The transmission-phase view of one export: the data path of ``lun`` (a
    VirtualLun or DirectLun of the server's context), with the backing
    store's zeroing and hole-finding abilities found once."""

    def __cinit__(self, lun):
        cdef off_t r
        dp = lun._dp
        if not isinstance(dp, DataPath):
            raise ValueError("the LUN has no data path (closed?)")
        self.lun = lun
        self.dp = dp
        self._old_paths = []
        self.block_size = self.dp.block_size
        self.can_punch = self.dp.zero_mode != ZERO_WRITE
        # Holes can be found where lseek knows SEEK_DATA (files, memfd,
        # tmpfs); block devices do not.
        r = lseek(self.dp.fd, 0, SEEK_DATA)
        self.seek_holes = r >= 0 or errno == ENXIO
        lock_init(&self.rmw, CXL_LOCK_RW)
        self.rmw_ready = True

    def __dealloc__(self):
        if self.rmw_ready:
            lock_destroy(&self.rmw)

    def _recovered(self):
        """After a transfer found the context in error (an AFU reset):
        recover it as the LUN object does; True when the request may be
        re-driven.  The old data path stays referenced: a worker may still
        be using it."""
        dp = self.dp
        ok = bool(dp.on_reset is not None and dp.on_reset())
        new = getattr(self.lun, "_dp", None)
        if isinstance(new, DataPath) and new is not dp:
            self._old_paths.append(dp)
            self.dp = new
        return ok

    cdef int recover(self, int rc) noexcept nogil:
        if rc != XFER_IN_ERROR:
            return 0
        with gil:
            try:
                return 1 if self._recovered() else 0
            except BaseException:
                return 0

    cdef int run(self, uint64_t lba, uint64_t nblocks, char *buf, int write) noexcept nogil:
        """Read or write whole blocks: 0, an errno or an XFER_* code."""
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0
        rc = self.dp._run(lba, nblocks, buf, write, &afu_rc, &bad)
        if rc and self.recover(rc):
            rc = self.dp._run(lba, nblocks, buf, write, &afu_rc, &bad)
        return rc

    cdef int zero_blocks(self, uint64_t lba, uint64_t nblocks, int mode) noexcept nogil:
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0
        cxl_rdlock(&self.rmw)
        rc = self.dp._zero(lba, nblocks, mode, &afu_rc, &bad)
        cxl_unlock(&self.rmw)
        if rc and self.recover(rc):
            cxl_rdlock(&self.rmw)
            rc = self.dp._zero(lba, nblocks, mode, &afu_rc, &bad)
            cxl_unlock(&self.rmw)
        if mode != ZERO_WRITE:
            # After the punch: a data run found before it is forgotten.
            atomic_inc(&self.punch_gen)
        return rc

    cdef int zero_bytes(self, char *blk, uint64_t offset, uint64_t length) noexcept nogil:
        """Zero ``length`` bytes at byte ``offset``, all within one block."""
        cdef uint64_t bs = self.block_size
        cdef int rc
        if length == 0:
            return 0
        cxl_wrlock(&self.rmw)
        rc = self.run(offset // bs, 1, blk, 0)
        if rc == 0:
            memset(blk + offset % bs, 0, length)
            rc = self.run(offset // bs, 1, blk, 1)
        cxl_unlock(&self.rmw)
        return rc

    cdef int sync(self) noexcept nogil:
        """fdatasync the backing store: every write completed before is
        durable (whichever connection or process made it)."""
        cdef int rc = 0, fd
        cdef cxl_store *st
        self.dp.table.read_lock()
        fd = self.dp.table.backing_fd(self.dp.handle, self.dp.fd)
        st = store_of(fd)
        if st != NULL:                  # an RBD image: its own flush
            rc = -st.ops.flush(st)
            self.dp.table.unlock()
            return rc
        while fdatasync(fd) != 0:
            if errno != EINTR:
                # A store with no cache to flush (a pipe-like fd) is durable.
                rc = 0 if errno == EINVAL else errno
                break
        self.dp.table.unlock()
        return rc

    cdef int extents(self, worker *w, uint64_t offset, uint64_t length, extent *out,
                     int max_out) noexcept nogil:
        """The export's bytes [offset, offset+length) as extents of data and
        holes of the backing store (SEEK_DATA/SEEK_HOLE on each chunk's
        physical range), adjacent ones merged, at most ``max_out`` - 1 (>= 1):
        what does not fit is left out (BLOCK_STATUS may describe less than
        was asked: the client asks again from where it ends; nothing not
        walked is ever called data).  The number of extents."""
        cdef int n = 0, afu_rc = 0, fd
        cdef bint cached
        cdef uint64_t gen = 0
        cdef uint64_t v = offset, end = offset + length, bs = self.block_size
        cdef uint64_t vlba, nblk, seg_end, phys, pend, q
        cdef int64_t p
        cdef off_t d, h
        cdef bint direct
        cdef uint32_t handle = self.dp.handle
        if length == 0:
            return 0
        self.dp.table.read_lock()
        fd = self.dp.table.backing_fd(handle, self.dp.fd)
        direct = (self.dp.table.rht[handle].fp >> 4) == RHT_FMT_DIRECT
        while v < end and n >= 0:
            vlba = v // bs
            p = chunk_step(self.dp.table, handle, direct, vlba, (end - 1) // bs - vlba + 1, 0,
                           &nblk, &afu_rc)
            if p < 0:
                break
            seg_end = (vlba + nblk) * bs
            if seg_end > end:
                seg_end = end
            phys = <uint64_t> p * bs + v % bs
            pend = phys + (seg_end - v)
            q = phys
            while q < pend:
                d = <off_t> q
                cached = (w.cache_fd == fd and w.cache_gen == self.punch_gen
                          and w.cache_d <= q < w.cache_h)
                if self.seek_holes and not cached:
                    gen = self.punch_gen
                    d = lseek(fd, <off_t> q, SEEK_DATA)
                    if d < 0:
                        d = <off_t> pend if errno == ENXIO else <off_t> q
                if <uint64_t> d > pend:
                    d = <off_t> pend
                if <uint64_t> d > q:
                    n = add_extent(out, n, max_out, v + (q - phys), <uint64_t> d - q, 1)
                    if n < 0:
                        break
                if <uint64_t> d >= pend:
                    break
                h = <off_t> pend
                if cached:
                    h = <off_t> w.cache_h
                elif self.seek_holes:
                    # SEEK_HOLE walks the data to its end (page by page on
                    # tmpfs): remember the run, so that the next request
                    # in it costs nothing.  Only data is remembered, and
                    # this export's punches forget it (punch_gen); a punch
                    # by another user of the store can only make this say
                    # data where there is a hole -- never the other way.
                    h = lseek(fd, d, SEEK_HOLE)
                    if h > d:
                        w.cache_fd = fd
                        w.cache_gen = gen
                        w.cache_d = <uint64_t> d
                        w.cache_h = <uint64_t> h
                if h <= d or <uint64_t> h > pend:
                    h = <off_t> pend
                n = add_extent(out, n, max_out, v + (<uint64_t> d - phys),
                               <uint64_t> (h - d), 0)
                if n < 0:
                    break
                q = <uint64_t> h
            v = seg_end
        self.dp.table.unlock()
        return max_out - 1 if n < 0 else n


cdef inline bint all_zero(const char *p, uint64_t n) noexcept nogil:
    # Data usually differs from zero in its first word: that is all it costs.
    cdef uint64_t w0 = 0
    if n < 8:
        return n == 0 or (p[0] == 0 and (n == 1 or memcmp(p, p + 1, n - 1) == 0))
    memcpy(&w0, p, 8)
    return w0 == 0 and memcmp(p, p + 1, n - 1) == 0


cdef int zero_runs(const char *data, uint64_t offset, uint64_t length, extent *out,
                   int max_out) noexcept nogil:
    """The read's bytes [offset, offset+length), already in ``data``, as
    extents of data and of zeros (4 KiB granules of the export, adjacent
    ones merged; at most ``max_out``, the rest data): a READ reply sends
    the zero runs as hole chunks.  The number of extents."""
    cdef int n = 0
    cdef uint64_t g = offset, end = offset + length, ge
    while g < end:
        ge = (g // ZERO_GRANULE + 1) * ZERO_GRANULE
        if ge > end:
            ge = end
        n = add_extent(out, n, max_out, g, ge - g,
                       1 if all_zero(data + (g - offset), ge - g) else 0)
        if n < 0:
            n = max_out - 1
            if out[n - 1].hole:
                out[n].offset = g
                out[n].length = end - g
                out[n].hole = 0
                n += 1
            else:
                out[n - 1].length = end - out[n - 1].offset
            return n
        g = ge
    return n


cdef int add_extent(extent *out, int n, int max_out, uint64_t offset, uint64_t length,
                    int hole) noexcept nogil:
    """Append (or merge) an extent; -1 when the list is full, keeping one
    slot for the remainder."""
    if n > 0 and out[n - 1].hole == hole and out[n - 1].offset + out[n - 1].length == offset:
        out[n - 1].length += length
        return n
    if n >= max_out - 1:
        return -1
    out[n].offset = offset
    out[n].length = length
    out[n].hole = hole
    return n + 1


cdef class NbdConnection:
    """NbdConnection(fd, export, size, structured, meta_id)

    One client in the transmission phase on socket ``fd`` (which the caller
    keeps open until every :meth:`serve` call has returned).  ``size``: the
    export's size as this client was told it; ``structured``: structured
    replies were negotiated; ``meta_id``: the id given to
    ``base:allocation`` (0: none).  Call :meth:`serve` from as many threads
    as requests may be in flight."""

    def __cinit__(self, int fd, NbdExport export not None, uint64_t size,
                  bint structured, uint32_t meta_id):
        self.fd = fd
        self.export = export
        self.size = size
        self.structured = structured
        self.meta_id = meta_id
        self.why_c = NULL
        lock_init(&self.recv_mu, CXL_LOCK_MUTEX)
        try:
            lock_init(&self.send_mu, CXL_LOCK_MUTEX)
        except BaseException:
            lock_destroy(&self.recv_mu)
            raise
        self.locks_ready = True

    def __dealloc__(self):
        if self.locks_ready:
            lock_destroy(&self.recv_mu)
            lock_destroy(&self.send_mu)

    @property
    def why(self):
        """Why the connection ended (None: the client disconnected cleanly,
        or it has not ended)."""
        return None if self.why_c == NULL else self.why_c.decode()

    @property
    def ended(self):
        return bool(self.dead or self.closing)

    def serve(self):
        """Serve requests until the client disconnects (NBD_CMD_DISC, end
        of stream), a protocol error, or :meth:`abort`."""
        cdef worker *w = <worker *> calloc(1, sizeof(worker))
        cdef void *blk = NULL
        if w == NULL:
            raise MemoryError()
        if posix_memalign(&blk, 4096, self.export.block_size) != 0:
            free(w)
            raise MemoryError()
        w.blk = <char *> blk
        w.cache_fd = -1
        try:
            with nogil:
                self.loop(w)
        finally:
            free(w.buf)
            free(w.blk)
            free(w)

    def abort(self):
        """End the connection now (the server stops): workers waiting for a
        request return; replies not yet sent are lost."""
        self.dead = 1
        shutdown(self.fd, SHUT_RDWR)

    cdef void die(self, const char *why) noexcept nogil:
        if self.why_c == NULL:
            self.why_c = why
        self.dead = 1
        shutdown(self.fd, SHUT_RDWR)

    cdef int send(self, void *iovp, int n) noexcept nogil:
        """sendmsg all of the iovecs (which it consumes): 0, or -1 (the
        connection is then dead).  Caller holds send_mu."""
        cdef iovec *iov = <iovec *> iovp
        cdef msghdr m
        cdef ssize_t r
        memset(&m, 0, sizeof(m))
        while n > 0:
            m.msg_iov = iov
            m.msg_iovlen = n
            r = sendmsg(self.fd, &m, MSG_NOSIGNAL)
            if r < 0:
                if errno == EINTR:
                    continue
                self.die("the connection failed while sending a reply")
                return -1
            while n > 0 and <size_t> r >= iov[0].iov_len:
                r -= iov[0].iov_len
                iov += 1
                n -= 1
            if n > 0 and r > 0:
                iov[0].iov_base = <char *> iov[0].iov_base + r
                iov[0].iov_len -= r
        return 0

    cdef int reply(self, worker *w, uint64_t cookie, int error,
                   const char *msg) noexcept nogil:
        """A reply without data: simple, or (structured replies, an error)
        one ERROR chunk with a message.  READ errors are always chunks."""
        cdef iovec iov[1]
        cdef uint32_t mlen
        cdef int rc
        cdef char *h = w.hdr
        if self.structured and error and msg != NULL:
            mlen = <uint32_t> strlen(msg)
            if mlen > 1024:
                mlen = 1024
            put32(h, NBD_STRUCTURED_REPLY_MAGIC)
            put16(h + 4, NBD_REPLY_FLAG_DONE)
            put16(h + 6, NBD_REPLY_TYPE_ERROR)
            memcpy(h + 8, &cookie, 8)
            put32(h + 16, 6 + mlen)
            put32(h + 20, <uint32_t> error)
            put16(h + 24, <uint16_t> mlen)
            iov[0].iov_base = h
            iov[0].iov_len = 26
            cxl_mutex_lock(&self.send_mu)
            self.requests += 1
            self.errors += 1
            rc = self.send(iov, 1)
            if rc == 0 and mlen:
                iov[0].iov_base = <void *> msg
                iov[0].iov_len = mlen
                rc = self.send(iov, 1)
            cxl_mutex_unlock(&self.send_mu)
            return rc
        put32(h, NBD_SIMPLE_REPLY_MAGIC)
        put32(h + 4, <uint32_t> error)
        memcpy(h + 8, &cookie, 8)
        iov[0].iov_base = h
        iov[0].iov_len = SIMPLE_SIZE
        cxl_mutex_lock(&self.send_mu)
        self.requests += 1
        if error:
            self.errors += 1
        rc = self.send(iov, 1)
        cxl_mutex_unlock(&self.send_mu)
        return rc

    cdef int loop(self, worker *w) noexcept nogil:
        cdef char req[REQUEST_SIZE]
        cdef uint16_t flags, typ
        cdef uint32_t length
        cdef uint64_t cookie, offset, bs = self.export.block_size, skew
        while True:
            cxl_mutex_lock(&self.recv_mu)
            if self.dead or self.closing:
                cxl_mutex_unlock(&self.recv_mu)
                return 0
            if recv_full(self.fd, req, REQUEST_SIZE):
                if not self.dead:
                    self.die("the client closed the connection without NBD_CMD_DISC")
                cxl_mutex_unlock(&self.recv_mu)
                return 0
            if get32(req) != NBD_REQUEST_MAGIC:
                self.die("a request with a bad magic number")
                cxl_mutex_unlock(&self.recv_mu)
                return 0
            flags = get16(req + 4)
            typ = get16(req + 6)
            memcpy(&cookie, req + 8, 8)         # opaque: sent back as it came
            offset = get64(req + 16)
            length = get32(req + 24)
            if typ == NBD_CMD_WRITE:
                if length > NBD_MAX_PAYLOAD:
                    self.die("a WRITE longer than the 32 MiB maximum")
                    cxl_mutex_unlock(&self.recv_mu)
                    return 0
                skew = offset % bs
                if grow(w, skew + length + 2 * bs):
                    self.die("out of memory for a WRITE payload")
                    cxl_mutex_unlock(&self.recv_mu)
                    return 0
                if recv_full(self.fd, w.buf + skew, length):
                    self.die("the client closed the connection in the middle of a WRITE")
                    cxl_mutex_unlock(&self.recv_mu)
                    return 0
            elif typ == NBD_CMD_DISC:
                self.closing = 1
                cxl_mutex_unlock(&self.recv_mu)
                return 0
            cxl_mutex_unlock(&self.recv_mu)
            self.handle(w, flags, typ, cookie, offset, length)
            if w.cap > NBD_KEEP_BUFFER:
                # Large payloads are rare: do not keep 32 MiB per worker.
                free(w.buf)
                w.buf = NULL
                w.cap = 0

    cdef int handle(self, worker *w, uint16_t flags, uint16_t typ, uint64_t cookie,
                    uint64_t offset, uint32_t length) noexcept nogil:
        cdef uint64_t bs = self.export.block_size, end, a, b
        cdef int rc = 0
        if flags & ~allowed_flags(typ):
            # Unknown flags, and flags the spec does not give this command.
            return self.reply(w, cookie, NBD_EINVAL,
                             "a command flag this command does not take")
        if (flags & NBD_CMD_FLAG_DF) and not self.structured:
            return self.reply(w, cookie, NBD_EINVAL,
                             "NBD_CMD_FLAG_DF without structured replies")
        if typ == NBD_CMD_FLUSH:
            rc = self.export.sync()
            return self.reply(w, cookie, wire_error(rc) if rc else 0,
                              "the flush of the backing store failed")
        if typ > NBD_CMD_BLOCK_STATUS or typ == NBD_CMD_DISC:
            return self.reply(w, cookie, NBD_EINVAL, "unknown command")
        if typ == NBD_CMD_READ and length > NBD_MAX_PAYLOAD:
            return self.reply(w, cookie,
                             NBD_EOVERFLOW if flags & NBD_CMD_FLAG_DF else NBD_EINVAL,
                             "a READ longer than the 32 MiB maximum")
        if length == 0:
            return self.reply(w, cookie, NBD_EINVAL, "a request of length 0")
        if offset > self.size or length > self.size - offset:
            # As the spec has it: a write past the end is out of space, any
            # other request past it invalid.
            return self.reply(w, cookie,
                             NBD_ENOSPC if typ == NBD_CMD_WRITE or typ == NBD_CMD_WRITE_ZEROES
                             else NBD_EINVAL, "beyond the end of the export")
        end = offset + length
        if typ == NBD_CMD_READ:
            return self.do_read(w, flags, cookie, offset, length)
        if typ == NBD_CMD_WRITE:
            rc = self.do_write(w, offset, length)
        elif typ == NBD_CMD_WRITE_ZEROES:
            if (flags & NBD_CMD_FLAG_FAST_ZERO) and (
                    (flags & NBD_CMD_FLAG_NO_HOLE) or not self.export.can_punch):
                return self.reply(w, cookie, NBD_ENOTSUP,
                                 "zeroing is not faster than writing here")
            a = (offset + bs - 1) // bs
            b = end // bs
            if a > b:                   # within one block
                rc = self.export.zero_bytes(w.blk, offset, length)
            else:
                rc = self.export.zero_bytes(w.blk, offset, a * bs - offset)
                if rc == 0 and b > a:
                    rc = self.export.zero_blocks(a, b - a, ZERO_WRITE if flags & NBD_CMD_FLAG_NO_HOLE
                                        else self.export.dp.zero_mode)
                if rc == 0:
                    rc = self.export.zero_bytes(w.blk, b * bs, end - b * bs)
        elif typ == NBD_CMD_TRIM:
            # Advisory: whole blocks only, and only where it is cheap.
            a = (offset + bs - 1) // bs
            b = end // bs
            if b > a and self.export.can_punch:
                rc = self.export.zero_blocks(a, b - a, self.export.dp.zero_mode)
        elif typ == NBD_CMD_BLOCK_STATUS:
            return self.do_block_status(w, flags, cookie, offset, length)
        # NBD_CMD_CACHE: the backing store is the cache; nothing to do.
        if rc == 0 and (flags & NBD_CMD_FLAG_FUA) and typ != NBD_CMD_CACHE:
            rc = self.export.sync()
        return self.reply(w, cookie, wire_error(rc) if rc else 0,
                          "the I/O on the backing store failed" if rc != XFER_AFU_ERROR
                          else "the export's LUN refused the range")

    cdef int do_write(self, worker *w, uint64_t offset, uint32_t length) noexcept nogil:
        cdef uint64_t bs = self.export.block_size
        cdef uint64_t first = offset // bs, skew = offset % bs
        cdef uint64_t tail = (offset + length) % bs
        cdef uint64_t nblk = (skew + length + bs - 1) // bs
        cdef int rc = 0
        if skew == 0 and tail == 0:
            # Whole blocks: shared with other such writes, excluded while a
            # partial block is read, patched and written back (which would
            # write this write's bytes back with the old data).
            cxl_rdlock(&self.export.rmw)
            rc = self.export.run(first, nblk, w.buf, 1)
            cxl_unlock(&self.export.rmw)
            return rc
        cxl_wrlock(&self.export.rmw)
        if skew:
            rc = self.export.run(first, 1, w.blk, 0)
            if rc == 0:
                memcpy(w.buf, w.blk, skew)
        if rc == 0 and tail:
            rc = self.export.run(first + nblk - 1, 1, w.blk, 0)
            if rc == 0:
                memcpy(w.buf + skew + length, w.blk + tail, bs - tail)
        if rc == 0:
            rc = self.export.run(first, nblk, w.buf, 1)
        cxl_unlock(&self.export.rmw)
        return rc

    cdef int do_read(self, worker *w, uint16_t flags, uint64_t cookie, uint64_t offset,
                     uint32_t length) noexcept nogil:
        cdef uint64_t bs = self.export.block_size
        cdef uint64_t skew = offset % bs
        cdef uint64_t nblk = (skew + length + bs - 1) // bs
        cdef iovec iov[2 * NBD_MAX_EXTENTS + 1]
        cdef int rc, nx = 0, i, k = 0
        cdef char *h
        cdef char *data
        if grow(w, nblk * bs):
            return self.reply(w, cookie, NBD_ENOMEM,
                             "out of memory for a READ")
        rc = self.export.run(offset // bs, nblk, w.buf, 0)
        if rc:
            return self.reply(w, cookie, wire_error(rc),
                             "the read of the backing store failed")
        data = w.buf + skew
        if not self.structured:
            h = w.hdr
            put32(h, NBD_SIMPLE_REPLY_MAGIC)
            put32(h + 4, 0)
            memcpy(h + 8, &cookie, 8)
            iov[0].iov_base = h
            iov[0].iov_len = SIMPLE_SIZE
            iov[1].iov_base = data
            iov[1].iov_len = length
            k = 2
        else:
            if length >= NBD_HOLE_READ_MIN and not (flags & NBD_CMD_FLAG_DF):
                nx = zero_runs(data, offset, length, w.ext, NBD_MAX_EXTENTS)
            if nx == 0:
                nx = 1
                w.ext[0].offset = offset
                w.ext[0].length = length
                w.ext[0].hole = 0
            h = w.hdr
            for i in range(nx):
                put32(h, NBD_STRUCTURED_REPLY_MAGIC)
                put16(h + 4, NBD_REPLY_FLAG_DONE if i == nx - 1 else 0)
                memcpy(h + 8, &cookie, 8)
                put64(h + 20, w.ext[i].offset)
                iov[k].iov_base = h
                if w.ext[i].hole:
                    put16(h + 6, NBD_REPLY_TYPE_OFFSET_HOLE)
                    put32(h + 16, 12)
                    put32(h + 28, <uint32_t> w.ext[i].length)
                    iov[k].iov_len = 32
                    k += 1
                else:
                    put16(h + 6, NBD_REPLY_TYPE_OFFSET_DATA)
                    put32(h + 16, <uint32_t> (8 + w.ext[i].length))
                    iov[k].iov_len = 28
                    iov[k + 1].iov_base = data + (w.ext[i].offset - offset)
                    iov[k + 1].iov_len = w.ext[i].length
                    k += 2
                h += 32
        cxl_mutex_lock(&self.send_mu)
        self.requests += 1
        rc = self.send(iov, k)
        cxl_mutex_unlock(&self.send_mu)
        return rc

    cdef int do_block_status(self, worker *w, uint16_t flags, uint64_t cookie,
                             uint64_t offset, uint32_t length) noexcept nogil:
        cdef iovec iov[2]
        cdef char *h = w.hdr
        cdef char *d
        cdef int nx, i, rc
        if self.meta_id == 0:
            return self.reply(w, cookie, NBD_EINVAL,
                             "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT "
                             "base:allocation)")
        nx = self.export.extents(w, offset, length, w.ext, NBD_MAX_EXTENTS)
        if nx == 0:
            return self.reply(w, cookie, NBD_EIO,
                             "the allocation map is not available")
        if flags & NBD_CMD_FLAG_REQ_ONE:
            nx = 1
        put32(h, NBD_STRUCTURED_REPLY_MAGIC)
        put16(h + 4, NBD_REPLY_FLAG_DONE)
        put16(h + 6, NBD_REPLY_TYPE_BLOCK_STATUS)
        memcpy(h + 8, &cookie, 8)
        put32(h + 16, <uint32_t> (4 + 8 * nx))
        put32(h + 20, self.meta_id)
        d = h + 24
        for i in range(nx):
            put32(d, <uint32_t> w.ext[i].length)
            put32(d + 4, (NBD_STATE_HOLE | NBD_STATE_ZERO) if w.ext[i].hole else 0)
            d += 8
        iov[0].iov_base = h
        iov[0].iov_len = 24 + 8 * nx
        cxl_mutex_lock(&self.send_mu)
        self.requests += 1
        rc = self.send(iov, 1)
        cxl_mutex_unlock(&self.send_mu)
        return rc
