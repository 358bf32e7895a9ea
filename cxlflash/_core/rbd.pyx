"""A physical LUN on a Ceph RBD image, through librbd's C API.

Built only where librbd's headers are (Debian ``librbd-dev``).  An
``RbdImage`` is one open image: its own cluster connection (librados),
with ``rbd_cache`` off -- a cache that acknowledges writes before the OSDs
have them would lose acknowledged data on a fault -- and ``timeout``
seconds for every request to an OSD or monitor (``rados_osd_op_timeout``,
``rados_mon_op_timeout``, ``client_mount_timeout``), after which a data
request fails with EIO instead of waiting forever.

The image is registered as a store (``store.pyx``) under its completion
eventfd: the data path reads and writes it with librbd's synchronous calls,
its engine (``engine()``) with librbd's aio calls (``includes/rbd.h``).
Every call that waits on the cluster runs without the GIL.
"""
from libc.errno cimport EBUSY, EINVAL, EIO, ENOENT, EROFS, ETIMEDOUT
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from cxlflash._core.store cimport (cxl_store, cxl_store_ops, store_register,
                                   store_unregister)

import os
import socket

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "rados/librados.h" nogil:
    ctypedef void *rados_t
    ctypedef void *rados_ioctx_t
    int rados_create2(rados_t *pcluster, const char *clustername, const char *name,
                      uint64_t flags)
    int rados_conf_read_file(rados_t cluster, const char *path)
    int rados_conf_parse_env(rados_t cluster, const char *var)
    int rados_conf_set(rados_t cluster, const char *option, const char *value)
    int rados_connect(rados_t cluster)
    int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx)
    void rados_ioctx_destroy(rados_ioctx_t io)
    void rados_shutdown(rados_t cluster)

cdef extern from "rbd/librbd.h" nogil:
    ctypedef void *rbd_image_t
    ctypedef enum rbd_lock_mode_t:
        RBD_LOCK_MODE_EXCLUSIVE
        RBD_LOCK_MODE_SHARED
    enum:
        EVENT_TYPE_EVENTFD
    void rbd_version(int *major, int *minor, int *extra)
    int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name)
    int rbd_close(rbd_image_t image)
    int rbd_set_image_notification(rbd_image_t image, int fd, int type)
    int rbd_get_size(rbd_image_t image, uint64_t *size)
    int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode)
    int rbd_lock_release(rbd_image_t image)
    int rbd_is_exclusive_lock_owner(rbd_image_t image, int *is_owner)
    int rbd_lock_get_owners(rbd_image_t image, rbd_lock_mode_t *lock_mode,
                            char **lock_owners, size_t *max_lock_owners)
    void rbd_lock_get_owners_cleanup(char **lock_owners, size_t lock_owner_count)
    int rbd_metadata_get(rbd_image_t image, const char *key, char *value, size_t *val_len)
    int rbd_metadata_set(rbd_image_t image, const char *key, const char *value)
    int rbd_metadata_remove(rbd_image_t image, const char *key)

cdef extern from "rbd.h" nogil:
    ctypedef struct cxl_rbd:
        cxl_store st
        rados_t cluster
        rados_ioctx_t ioctx
        rbd_image_t image
        void *be
    const cxl_store_ops cxl_rbd_store_ops
    void cxl_rbd_init(cxl_rbd *d)
    void cxl_rbd_fini(cxl_rbd *d) nogil

#: The image metadata key where the process holding the exclusive lock
#: names itself (host and pid), for the error of the one refused.
cdef const char *HOLDER_KEY = b"cxlflash.holder"


def version():
    """librbd's version, "major.minor.extra"."""
    cdef int a = 0, b = 0, c = 0
    rbd_version(&a, &b, &c)
    return f"{a}.{b}.{c}"


cdef str _why(int err):
    return os.strerror(err)


cdef class RbdImage:
    """RbdImage(pool, image, conf=None, client_id="admin", timeout=30)

    One RBD image, open: ``fd`` names it in the data path; ``size()`` is
    its size in bytes now.  ``lock()`` takes RBD's exclusive lock for this
    process (EBUSY naming the holder when another has it); ``close()``
    releases everything (nothing may be in flight).
    """
    cdef cxl_rbd *d
    cdef readonly int fd
    cdef readonly str name
    cdef readonly bint locked
    cdef int pid

    def __cinit__(self, str pool, str image, conf=None, str client_id="admin",
                  timeout=30):
        cdef rados_t cluster = NULL
        cdef rados_ioctx_t ioctx = NULL
        cdef rbd_image_t img = NULL
        cdef int r, efd = -1
        cdef bytes bpool = pool.encode(), bimage = image.encode()
        cdef bytes bid = b"client." + client_id.encode()
        cdef bytes bconf = os.fsencode(conf) if conf is not None else None
        cdef const char *cconf = NULL
        cdef const char *cpool = bpool
        cdef const char *cimage = bimage
        cdef bytes t = str(timeout).encode()
        if bconf is not None:
            cconf = bconf
        self.d = NULL
        self.fd = -1
        self.pid = os.getpid()
        self.name = f"rbd:{pool}/{image}"
        where = self.name
        r = rados_create2(&cluster, b"ceph", bid, 0)
        if r < 0:
            raise OSError(-r, f"{where}: cannot make a Ceph client {bid.decode()!r}: {_why(-r)}")
        try:
            r = rados_conf_read_file(cluster, cconf)
            if r < 0 and conf is not None:
                raise OSError(-r, f"{where}: cannot read the Ceph config file {conf!r}: "
                              f"{_why(-r)}")
            rados_conf_parse_env(cluster, NULL)     # CEPH_ARGS, as the ceph tools do
            for key, value in ((b"rbd_cache", b"false"),
                               (b"rados_osd_op_timeout", t),
                               (b"rados_mon_op_timeout", t),
                               (b"client_mount_timeout", t)):
                r = rados_conf_set(cluster, key, value)
                if r < 0:
                    raise OSError(-r, f"{where}: cannot set {key.decode()}: {_why(-r)}")
            with nogil:
                r = rados_connect(cluster)
            if r < 0:
                raise OSError(-r, f"{where}: cannot connect to the Ceph cluster"
                              + (f" of {conf!r}" if conf is not None else
                                 " (no conf= given: librados looked in CEPH_CONF and "
                                 "/etc/ceph/ceph.conf)")
                              + f": {_why(-r)}"
                              + (f" within timeout={timeout} s" if r == -ETIMEDOUT else ""))
            r = rados_ioctx_create(cluster, cpool, &ioctx)
            if r < 0:
                raise OSError(-r, f"{where}: no pool {pool!r}: {_why(-r)}"
                              if r == -ENOENT else f"{where}: cannot open pool {pool!r}: "
                              f"{_why(-r)}")
            with nogil:
                r = rbd_open(ioctx, cimage, &img, NULL)
            if r < 0:
                raise OSError(-r, f"{where}: no image {image!r} in pool {pool!r} "
                              f"(create it with: rbd create --size SIZE {pool}/{image})"
                              if r == -ENOENT else
                              f"{where}: cannot open image {image!r}: {_why(-r)}")
            efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
            if efd < 0:
                raise OSError(EIO,
                              f"{where}: cannot make its completion eventfd")
            r = rbd_set_image_notification(img, efd, EVENT_TYPE_EVENTFD)
            if r < 0:
                raise OSError(-r, f"{where}: cannot set its completion notification: "
                              f"{_why(-r)}")
            self.d = <cxl_rbd *> calloc(1, sizeof(cxl_rbd))
            if self.d == NULL:
                raise MemoryError()
            cxl_rbd_init(self.d)
            self.d.st.ops = &cxl_rbd_store_ops
            self.d.st.fd = efd
            self.d.st.pid = self.pid
            self.d.cluster = cluster
            self.d.ioctx = ioctx
            self.d.image = img
            store_register(&self.d.st)
            self.fd = efd
        except BaseException:
            if self.d != NULL:
                free(self.d)
                self.d = NULL
            if img != NULL:
                with nogil:
                    rbd_close(img)
            if efd >= 0:
                close(efd)
            if ioctx != NULL:
                rados_ioctx_destroy(ioctx)
            with nogil:
                rados_shutdown(cluster)
            raise

    cdef int _check(self) except -1:
        if self.d == NULL:
            raise OSError(EINVAL, f"{self.name} is closed")
        return 0

    def size(self):
        """The image's size in bytes now (an ``rbd resize`` shows at once)."""
        cdef uint64_t n = 0
        cdef int r
        self._check()
        with nogil:
            r = rbd_get_size(self.d.image, &n)
        if r < 0:
            raise OSError(EIO if r == -ETIMEDOUT else -r,
                          f"{self.name}: cannot read its size: {_why(-r)}")
        return n

    cdef list _owners(self):
        """The clients holding the image's exclusive lock (their addresses)."""
        cdef char *owners[8]
        cdef size_t n = 8
        cdef rbd_lock_mode_t mode
        cdef int r
        with nogil:
            r = rbd_lock_get_owners(self.d.image, &mode, owners, &n)
        if r < 0:
            return []
        try:
            return [owners[i].decode(errors="replace") for i in range(n)]
        finally:
            rbd_lock_get_owners_cleanup(owners, n)

    cdef tuple _named_holder(self):
        """(address, description) a cxlflash holder wrote in the image's
        metadata, or None."""
        cdef char value[512]
        cdef size_t vlen = sizeof(value)
        cdef int r
        memset(value, 0, sizeof(value))
        with nogil:
            r = rbd_metadata_get(self.d.image, HOLDER_KEY, value, &vlen)
        if r != 0:
            return None
        addr, _, what = value[:vlen].rstrip(b"\0").decode(errors="replace").partition("\t")
        return addr, what

    def holder(self):
        """Who holds the image's exclusive lock: a description, or None."""
        self._check()
        owners = self._owners()
        if not owners:
            return None
        named = self._named_holder()
        return ", ".join(f"{o}: {named[1]}" if named and named[0] == o else o for o in owners)

    cdef _refuse(self):
        raise OSError(EBUSY, f"{self.name} is in use in virtual mode by another "
                      f"client [{self.holder() or 'holder unknown'}]: two allocators must "
                      "not carve virtual LUNs out of one image; stop that one, or give "
                      "this LUN another image")

    def lock(self):
        """Take RBD's exclusive lock on the image for this process (kept
        until ``unlock()`` or ``close()``): EBUSY, naming the holder, when
        another cxlflash process has it.  May wait ``timeout`` seconds for
        a holder that died (its watch expires, librbd then breaks its lock).

        librbd's rule: once a client asked for the lock by hand, it writes
        only while it holds it.  So a lock another cxlflash process holds
        (its address, recorded in the image's metadata, among the owners)
        is refused without asking; a client that merely writes directly
        holds the lock only until asked, and is asked."""
        cdef int r, owner = 0
        cdef bytes me
        cdef const char *cme
        self._check()
        if self.locked:
            return
        named = self._named_holder()
        if named is not None and named[0] in self._owners():
            self._refuse()
        with nogil:
            r = rbd_lock_acquire(self.d.image, RBD_LOCK_MODE_EXCLUSIVE)
        if r == -EROFS or r == -EBUSY:
            self._refuse()
        if r == -EINVAL:
            raise OSError(EINVAL, f"{self.name} cannot be locked: it lacks the "
                          "exclusive-lock feature (rbd feature enable "
                          f"{self.name[4:]} exclusive-lock)")
        if r < 0:
            raise OSError(EIO if r == -ETIMEDOUT else -r,
                          f"{self.name}: cannot take its exclusive lock: {_why(-r)}")
        with nogil:
            r = rbd_is_exclusive_lock_owner(self.d.image, &owner)
        if r < 0 or not owner:
            raise OSError(EBUSY, f"{self.name}: the exclusive lock was taken but this "
                          "client does not own it")
        self.locked = True
        mine = self._owners()
        me = (f"{mine[0] if len(mine) == 1 else ''}\tcxlflash on {socket.gethostname()}, "
              f"pid {os.getpid()}").encode()
        cme = me
        with nogil:
            r = rbd_metadata_set(self.d.image, HOLDER_KEY, cme)

    def unlock(self):
        """Release the exclusive lock (if this process holds it)."""
        cdef int r
        if self.d == NULL or not self.locked:
            return
        self.locked = False
        with nogil:
            rbd_metadata_remove(self.d.image, HOLDER_KEY)     # no longer ours to name
            r = rbd_lock_release(self.d.image)

    def close(self):
        """Release the lock, close the image and the cluster connection.
        Nothing may be in flight (its engine closed first)."""
        if self.d == NULL:
            return
        if self.pid != os.getpid():         # a forked child: the parent's
            self.d = NULL
            return
        self.unlock()
        store_unregister(&self.d.st)
        with nogil:
            cxl_rbd_fini(self.d)            # its prober (an outage) ends first
            rbd_close(self.d.image)
            rados_ioctx_destroy(self.d.ioctx)
            rados_shutdown(self.d.cluster)
        close(self.d.st.fd)
        free(self.d)
        self.d = NULL
        self.fd = -1

    def __dealloc__(self):
        if self.d != NULL:
            self.close()
