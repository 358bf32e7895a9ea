"""Constants and helpers of the driver tests: one argument builder per ioctl
(``<name>_arg``), one call per ioctl (``attach``, ``uvirtual``, ``udirect``,
``resize``, ``release``, ``detach``, ``clone``, ``verify``, ``recover``,
``manage``), ``call``/``fails`` to issue any request, and the driver probes.

Every call takes an optional ``caller``: ``None`` goes through the public
``cxlflash.ioctl``; a :class:`Caller` (``CHILD``, ``STRANGER``, or one made
for the test) poses as another process through ``superpipe.disk_ioctl``,
which only an embedded adapter has.  A failed ioctl leaves its argument
byte-for-byte untouched: ``fails()`` checks that every time.

Adapter fds handed out by ATTACH and RECOVER_AFU are recorded in
``_open_fds`` and closed at teardown (``close_fd`` closes one earlier).
"""
import ctypes
import errno
import os
import threading
import time

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi, CxlFlashError
from cxlflash._core.datapath import afu_command
from cxlflash.driver import superpipe
from cxlflash.driver.context import Caller

# -- geometry -----------------------------------------------------------------

U64 = (1 << 64) - 1
CHUNK = 1 << 16                  # native blocks per chunk
K4 = 4096
CHUNK_4K = CHUNK                 # 4K blocks per chunk of a 4K LUN
BLK = 512                        # native block size of the 512-byte test LUNs
CH = CHUNK * BLK // K4           # 4K blocks per chunk of a 512-byte LUN (8192)
NCHUNKS = 16                     # chunks of add_disk()'s LUN

# -- requests and flags -------------------------------------------------------

ATTACH = uapi.DK_CXLFLASH_ATTACH
DIRECT = uapi.DK_CXLFLASH_USER_DIRECT
RELEASE = uapi.DK_CXLFLASH_RELEASE
DETACH = uapi.DK_CXLFLASH_DETACH
VERIFY = uapi.DK_CXLFLASH_VERIFY
RECOVER = uapi.DK_CXLFLASH_RECOVER_AFU
MANAGE = uapi.DK_CXLFLASH_MANAGE_LUN
VIRTUAL = uapi.DK_CXLFLASH_USER_VIRTUAL
RESIZE = uapi.DK_CXLFLASH_VLUN_RESIZE
CLONE = uapi.DK_CXLFLASH_VLUN_CLONE
PROVISION = uapi.HT_CXLFLASH_LUN_PROVISION
DEBUG = uapi.HT_CXLFLASH_AFU_DEBUG
REUSE = uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT
ENABLE = uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE
DISABLE = uapi.DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE
HINT_SENSE = uapi.DK_CXLFLASH_VERIFY_HINT_SENSE

ALL_DK = [ATTACH, DIRECT, RELEASE, DETACH, VERIFY, RECOVER, MANAGE, VIRTUAL, RESIZE, CLONE]
NAMES = {r: uapi.IOCTL_NAMES[r][12:] for r in uapi.IOCTL_NAMES}

BAD_NUMBERS = {
    "unknown_nr": uapi.CXL_IOWR(0x8A, uapi.dk_cxlflash_attach),
    "wrong_size": (ATTACH & ~(uapi._IOC_SIZEMASK << uapi._IOC_SIZESHIFT)) | (100 << 16),
    "wrong_direction": ATTACH & ~(uapi._IOC_READ << uapi._IOC_DIRSHIFT),
    "wrong_magic": ATTACH ^ (0x01 << 8),
    "host_ioctl_on_disk": PROVISION,
    "zero": 0,
}

# -- processes ----------------------------------------------------------------

ME = os.getpid()
CHILD = Caller(pid=ME + 1_000_003, ppid=ME)      # a (pretend) forked child of this process
STRANGER = Caller(pid=ME + 2_000_003, ppid=1)    # an unrelated process

_open_fds = set()                # adapter fds handed out, closed at teardown


def close_fd(fd):
    _open_fds.discard(fd)
    try:
        os.close(fd)
    except OSError:
        pass


def close_open_fds():
    for fd in list(_open_fds):
        close_fd(fd)


# -- disks --------------------------------------------------------------------


#: While a test runs on an RBD image (``lun_backing`` "rbd", set by
#: driver/conftest.py): size in bytes -> the LUN string of a fresh image.
RBD_IMAGE = None


def add_disk(a, nchunks=NCHUNKS, ports=(0,), superpipe=True):
    """A LUN of ``nchunks`` chunks of 512-byte blocks, opened on its first
    port: in memory, or on an RBD image when the test runs on "rbd"."""
    size = nchunks * CHUNK * BLK
    if RBD_IMAGE is None:
        w = a.add_lun(None, size=size, block_size=BLK, ports=ports, superpipe=superpipe)
    else:
        w = a.add_lun(RBD_IMAGE(size), block_size=BLK, ports=ports, superpipe=superpipe)
    return a.open_disk(w, port=ports[0])


# -- issuing a request ----------------------------------------------------------


def call(d, req, arg, caller=None):
    """Issue ``req`` on disk ``d`` (as ``caller`` if given); returns ``arg``."""
    if caller is None:
        cxlflash.ioctl(d, req, arg)
    else:
        superpipe.disk_ioctl(d.adapter.driver, d.sdev, d, req, arg, caller)
    return arg


def _snapshot(arg):
    if isinstance(arg, (ctypes.Structure, bytes, bytearray)):
        return bytes(arg)
    return None


def fails(target, req, arg, err, caller=None):
    """The ioctl fails with ``err`` and leaves ``arg`` untouched; returns the
    exception.  ``target``: a disk or an adapter (host ioctls)."""
    before = _snapshot(arg)
    with pytest.raises(CxlFlashError) as ei:
        if caller is None:
            cxlflash.ioctl(target, req, arg)
        else:
            call(target, req, arg, caller)
    got = ei.value.errno
    assert got == err, (f"expected {errno.errorcode.get(err, err)}, got "
                        f"{errno.errorcode.get(got, got)}: {ei.value}")
    if before is not None:
        assert _snapshot(arg) == before, "a failed ioctl modified its argument"
    return ei.value


# -- argument builders ----------------------------------------------------------


def mk(cls, flags=0, **fields):
    """Any request structure: ``hdr.flags`` and the named fields set."""
    s = cls()
    s.hdr.flags = flags
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def attach_arg(cid=0, flags=os.O_RDWR, reuse=False, num_interrupts=0):
    return mk(uapi.dk_cxlflash_attach, flags | (REUSE if reuse else 0),
              context_id=cid, num_interrupts=num_interrupts)


def uvirtual_arg(cid, size=0, flags=0):
    return mk(uapi.dk_cxlflash_uvirtual, flags, context_id=cid, lun_size=size)


def udirect_arg(cid):
    return mk(uapi.dk_cxlflash_udirect, context_id=cid)


def resize_arg(cid, h, size):
    return mk(uapi.dk_cxlflash_resize, context_id=cid, rsrc_handle=h, req_size=size)


def release_arg(cid, h):
    return mk(uapi.dk_cxlflash_release, context_id=cid, rsrc_handle=h)


def detach_arg(cid):
    return mk(uapi.dk_cxlflash_detach, context_id=cid)


def clone_arg(src, dst):
    return mk(uapi.dk_cxlflash_clone, context_id_src=src, context_id_dst=dst)


def verify_arg(cid, h, sense=None, hint=None):
    """``hint`` defaults to HINT_SENSE when ``sense`` is given, else 0;
    ``sense`` fills the start of ``sense_data``."""
    if hint is None:
        hint = HINT_SENSE if sense is not None else 0
    s = mk(uapi.dk_cxlflash_verify, context_id=cid, rsrc_handle=h, hint=hint)
    if sense is not None:
        s.sense_data[:len(sense)] = list(bytes(sense))
    return s


def recover_arg(cid):
    return mk(uapi.dk_cxlflash_recover_afu, context_id=cid)


def manage_arg(wwid, flags=0):
    s = mk(uapi.dk_cxlflash_manage_lun, flags)
    s.wwid[:] = list(wwid)
    return s


def debug_arg(subcmd=0x04, ea=0, n=0, flags=0):
    s = mk(uapi.ht_cxlflash_afu_debug, flags, data_ea=ea, data_len=n)
    s.afu_subcmd[0] = subcmd
    return s


def provision_arg(sub, port=0, size=0, lun_id=0):
    s = mk(uapi.ht_cxlflash_lun_provision, port=port, size=size, lun_id=lun_id)
    s.hdr.subcmd = sub
    return s


# -- one call per ioctl (each returns its argument) ------------------------------


def attach(d, flags=os.O_RDWR, num_interrupts=0, reuse=None, caller=None):
    s = attach_arg(0 if reuse is None else reuse, flags, reuse is not None, num_interrupts)
    call(d, ATTACH, s, caller)
    if reuse is None:
        _open_fds.add(s.adap_fd)
    return s


def cid_of(d, **kw):
    return attach(d, **kw).context_id


def uvirtual(d, cid, size=0, flags=0, caller=None):
    return call(d, VIRTUAL, uvirtual_arg(cid, size, flags), caller)


def udirect(d, cid, caller=None):
    return call(d, DIRECT, udirect_arg(cid), caller)


def resize(d, cid, h, size, caller=None):
    return call(d, RESIZE, resize_arg(cid, h, size), caller)


def release(d, cid, h, caller=None):
    return call(d, RELEASE, release_arg(cid, h), caller)


def detach(d, cid, caller=None):
    return call(d, DETACH, detach_arg(cid), caller)


def clone(d, src, dst, caller=CHILD):
    return call(d, CLONE, clone_arg(src, dst), caller)


def verify(d, cid, h, sense=None, caller=None):
    return call(d, VERIFY, verify_arg(cid, h, sense), caller)


def last_lba(d, cid, h):
    return verify(d, cid, h).last_lba


def recover(d, cid, caller=None):
    s = call(d, RECOVER, recover_arg(cid), caller)
    if s.hdr.return_flags & uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD:
        _open_fds.add(s.adap_fd)
    return s


def manage(d, wwid, flags, caller=None):
    return call(d, MANAGE, manage_arg(wwid, flags), caller)


def as_proc(d, req, arg, caller):
    """Issue ``req`` posing as ``caller``; records the adapter fd of an ATTACH."""
    call(d, req, arg, caller)
    if req == ATTACH and not arg.hdr.flags & REUSE:
        _open_fds.add(arg.adap_fd)
    return arg


# -- the driver's records (embedded adapter only) ----------------------------------


def ctx(a, cid):
    """The driver's context record for a live id (None if there is none)."""
    c = a.driver.ctx_tbl[cid & 0xFFFFFFFF]
    return c if c is not None and c.ctxid == cid else None


def find_ctx(a, cid):
    """The context record of ``cid``, live or in error recovery (None if neither)."""
    drv = a.driver
    c = drv.ctx_tbl[cid & 0xFFFFFFFF] if (cid & 0xFFFFFFFF) < 512 else None
    if c is not None and c.ctxid == cid:
        return c
    return next((c for c in drv.ctx_err_recovery if c.ctxid == cid), None)


def chunks(a, cid, h):
    """The aun of each chunk of handle ``h``, in vLBA order."""
    return [int(x) for x in ctx(a, cid).table.auns(h)]


def glun(a, w):
    """The driver's global LUN record of WWID ``w``."""
    return a.driver.gluns[w]


def llun(a, w):
    return a.driver.lluns[w]


def disk_glun(d):
    """The global LUN record behind disk ``d`` (also once deleted)."""
    return d.sdev.llun.parent


def phys(a, w, plba, n=1):
    """Read ``n`` native blocks of the backing store at a physical LBA."""
    assert RBD_IMAGE is None, "phys() reads the memory backing's fd: the test must ask " \
        "for the fixture memory_backing"
    g = glun(a, w)
    bs = g.backing.block_size
    return os.pread(g.backing.fd, n * bs, plba * bs)


def chunk_bytes(a, w, aun, offset=0, n=1):
    return phys(a, w, aun * CHUNK + offset, n)


def child_io(a, cid, h, lba, data=None, nblocks=1):
    """The AFU command an impersonated context's process would issue."""
    c = ctx(a, cid)
    g = c.rht_lun[h].parent
    if data is None:
        buf = bytearray(nblocks * g.blk_len)
        afu_command(c.table, h, g.backing.fd, g.blk_len, lba, buf, False)
        return bytes(buf)
    return afu_command(c.table, h, g.backing.fd, g.blk_len, lba, data, True)


class RecordingAllocator:
    """Wraps a LUN's ChunkAllocator and records the order of frees."""

    def __init__(self, real):
        self._real = real
        self.freed = []

    def free_many(self, auns):
        self.freed.extend(int(x) for x in auns)
        return self._real.free_many(auns)

    def __getattr__(self, name):
        return getattr(self._real, name)


def returns_while_context_busy(a, cid, fn):
    """Run ``fn`` while the context's mutex is held by someone else.  A
    context lookup waits for the mutex; ``fn`` finishing means the check it
    failed ran before the lookup.  Returns the thread."""
    c = find_ctx(a, cid)
    c.mutex.acquire()
    try:
        t = Bg(fn)
        t.join(1.0)
        finished = not t.is_alive()
    finally:
        c.mutex.release()
    t.join(5)
    assert finished, "the ioctl waited for the context: the lookup ran first"
    return t


def valid_args(a, d):
    """A context with one virtual handle, a clone destination of a child,
    and a valid argument for every DK_* request (on disk ``d``)."""
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    dst = as_proc(d, ATTACH, attach_arg(), CHILD).context_id
    return cid, h, {
        ATTACH: attach_arg(),
        DIRECT: udirect_arg(cid),
        RELEASE: release_arg(cid, h),
        DETACH: detach_arg(cid),
        VERIFY: verify_arg(cid, h),
        RECOVER: recover_arg(cid),
        MANAGE: manage_arg(d.wwid, ENABLE),
        VIRTUAL: uvirtual_arg(cid, CH),
        RESIZE: resize_arg(cid, h, 2 * CH),
        CLONE: clone_arg(cid, dst),
    }


# -- data -----------------------------------------------------------------------


def last_lba_4k(nchunks, blk_len=K4):
    return U64 if nchunks == 0 else nchunks * CHUNK * blk_len // K4 - 1


def blocks(n, seed, bs=K4):
    return np.random.default_rng(seed).bytes(n * bs)


# -- threads --------------------------------------------------------------------


class Bg(threading.Thread):
    """Run ``fn`` in a thread; ``exc`` is what it raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.exc, self.result = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:       # noqa: BLE001 -- reported by the test
            self.exc = e

    @property
    def errno(self):
        return getattr(self.exc, "errno", None)


def signal_until_done(a, t, timeout=5.0):
    """Deliver simulated signals until ``t`` has finished."""
    end = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < end:
        a.signal_waiters()
        t.join(0.01)
    assert not t.is_alive(), "the waiting ioctl was not interrupted"


def wait_until(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def run_threads(*fns):
    """Run each of ``fns`` in its own thread; re-raise the first failure."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:              # noqa: BLE001
                errors.append(e)
        return run

    ts = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive()
    if errors:
        raise errors[0]
