# The NBD transmission phase (nbd.pyx): an export's data path and one
# connection's request loop, run by worker threads without the GIL.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from cxlflash._core.datapath cimport DataPath
from cxlflash._core.locks cimport cxl_lock

# Protocol numbers (doc/proto.md of the NBD project).
cdef enum:
    NBD_REQUEST_MAGIC = 0x25609513
    NBD_SIMPLE_REPLY_MAGIC = 0x67446698
    NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef

    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_CACHE = 5
    NBD_CMD_WRITE_ZEROES = 6
    NBD_CMD_BLOCK_STATUS = 7

    NBD_CMD_FLAG_FUA = 1
    NBD_CMD_FLAG_NO_HOLE = 2
    NBD_CMD_FLAG_DF = 4
    NBD_CMD_FLAG_REQ_ONE = 8
    NBD_CMD_FLAG_FAST_ZERO = 16

    NBD_REPLY_FLAG_DONE = 1
    NBD_REPLY_TYPE_NONE = 0
    NBD_REPLY_TYPE_OFFSET_DATA = 1
    NBD_REPLY_TYPE_OFFSET_HOLE = 2
    NBD_REPLY_TYPE_BLOCK_STATUS = 5
    NBD_REPLY_TYPE_ERROR = 32769

    NBD_STATE_HOLE = 1
    NBD_STATE_ZERO = 2

    # Errors on the wire.
    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108

    # The largest payload (READ or WRITE) served: the advertised maximum
    # block size.
    NBD_MAX_PAYLOAD = 32 * 1024 * 1024
    # A worker keeps a payload buffer up to this size between requests.
    NBD_KEEP_BUFFER = 4 * 1024 * 1024
    # Reads at least this long get hole chunks where the backing has holes.
    NBD_HOLE_READ_MIN = 64 * 1024
    # Extents per READ reply / BLOCK_STATUS reply.
    NBD_MAX_EXTENTS = 64


# One range of an export's bytes and whether the backing has data there.
cdef struct extent:
    uint64_t offset
    uint64_t length
    int hole


cdef struct worker:
    char *buf                    # payloads, aligned; grown on demand
    uint64_t cap
    char *blk                    # one block, for read-modify-write
    char hdr[NBD_MAX_EXTENTS * 32 + 64]   # reply headers
    extent ext[NBD_MAX_EXTENTS]
    # The last data run SEEK_HOLE found: [cache_d, cache_h) of cache_fd,
    # valid while the export's punch_gen is cache_gen.
    int cache_fd
    uint64_t cache_gen
    uint64_t cache_d
    uint64_t cache_h


cdef class NbdExport:
    # The data path of the export's LUN (replaced, never freed while the
    # export lives, after an AFU reset recovery: see _recovered()).
    cdef DataPath dp
    cdef list _old_paths
    cdef readonly object lun
    cdef readonly uint64_t block_size
    cdef readonly bint can_punch
    cdef readonly bint seek_holes
    # Held exclusive to read-modify-write partial blocks, shared by writes
    # and zeroing of whole blocks.
    cdef cxl_lock rmw
    cdef uint64_t punch_gen      # counts this export's hole punches (atomic)
    cdef bint rmw_ready

    cdef int recover(self, int rc) noexcept nogil
    cdef int run(self, uint64_t lba, uint64_t nblocks, char *buf, int write) noexcept nogil
    cdef int zero_blocks(self, uint64_t lba, uint64_t nblocks, int mode) noexcept nogil
    cdef int zero_bytes(self, char *blk, uint64_t offset, uint64_t length) noexcept nogil
    cdef int sync(self) noexcept nogil
    cdef int extents(self, worker *w, uint64_t offset, uint64_t length, extent *out,
                     int max_out) noexcept nogil


cdef class NbdConnection:
    cdef readonly int fd
    cdef readonly NbdExport export
    cdef readonly uint64_t size          # the size this client was told
    cdef readonly bint structured
    cdef readonly uint32_t meta_id       # base:allocation's id (0: not negotiated)
    cdef cxl_lock recv_mu
    cdef cxl_lock send_mu
    cdef bint locks_ready
    cdef volatile int dead               # the connection failed: every worker ends
    cdef volatile int closing            # DISC: no new request is read
    cdef readonly uint64_t requests
    cdef readonly uint64_t errors
    cdef const char *why_c               # why it ended (a static string), or NULL

    cdef int loop(self, worker *w) noexcept nogil
    cdef void die(self, const char *why) noexcept nogil
    cdef int send(self, void *iov, int n) noexcept nogil
    cdef int reply(self, worker *w, uint64_t cookie, int error,
                   const char *msg) noexcept nogil
    cdef int handle(self, worker *w, uint16_t flags, uint16_t typ, uint64_t cookie,
                    uint64_t offset, uint32_t length) noexcept nogil
    cdef int do_write(self, worker *w, uint64_t offset, uint32_t length) noexcept nogil
    cdef int do_read(self, worker *w, uint16_t flags, uint64_t cookie, uint64_t offset,
                     uint32_t length) noexcept nogil
    cdef int do_block_status(self, worker *w, uint16_t flags, uint64_t cookie,
                             uint64_t offset, uint32_t length) noexcept nogil
