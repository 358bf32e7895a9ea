# C declarations the core needs from libc, POSIX and Linux, in one place.
from libc.stdint cimport uint64_t, int64_t
from posix.types cimport off_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_rwlockattr_init(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *attr, int pref)
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP
    int pthread_rwlock_init(pthread_rwlock_t *lock, const pthread_rwlockattr_t *attr)
    int pthread_rwlock_destroy(pthread_rwlock_t *lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t *lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t *lock)
    int pthread_rwlock_unlock(pthread_rwlock_t *lock)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, off_t offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)


cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t len)


cdef extern from "<linux/falloc.h>" nogil:
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_ZERO_RANGE


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/fs.h>" nogil:
    unsigned long BLKZEROOUT
    unsigned long BLKDISCARD


cdef extern from *:
    """
    #define CXLFLASH_CTZ64(x) ((int)__builtin_ctzll((unsigned long long)(x)))
    #define CXLFLASH_POPCOUNT64(x) ((int)__builtin_popcountll((unsigned long long)(x)))
    """
    int ctz64 "CXLFLASH_CTZ64"(uint64_t x) nogil
    int popcount64 "CXLFLASH_POPCOUNT64"(uint64_t x) nogil


cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_HUGEPAGE


cdef extern from "<pthread.h>" nogil:
    int pthread_rwlock_tryrdlock(pthread_rwlock_t *lock)
    int pthread_rwlock_trywrlock(pthread_rwlock_t *lock)
    int pthread_atfork(void (*prepare)() noexcept nogil,
                       void (*parent)() noexcept nogil,
                       void (*child)() noexcept nogil)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int MSG_NOSIGNAL
    int SHUT_RDWR


cdef extern from "<unistd.h>" nogil:
    off_t lseek(int fd, off_t offset, int whence)
    int fdatasync(int fd)
    int SEEK_DATA
    int SEEK_HOLE


cdef extern from "<endian.h>" nogil:
    uint64_t htobe64(uint64_t x)
    uint64_t be64toh(uint64_t x)
    unsigned int htobe32(unsigned int x)
    unsigned int be32toh(unsigned int x)
    unsigned short htobe16(unsigned short x)
    unsigned short be16toh(unsigned short x)
