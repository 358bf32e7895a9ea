"""The fixtures, constants and ioctl argument builders of the spec §22 failure-table
tests and of the last differences from the kernel (both in
``test_ioctl_errors.py``)."""
import ctypes
import errno
import os
import threading
import time

import pytest

import cxlflash
from cxlflash import uapi, CxlFlashError, AfuError, AdapterResetError
from cxlflash.driver import superpipe, vlun as vlun_mod
from cxlflash.driver.core import Caller
from cxlflash.driver.lun import MODE_NONE, MODE_VIRTUAL, MODE_PHYSICAL
from scsi_sense import desc_sense, fixed_sense

BLK = 512                        # native block size of the test LUNs
CH = 65536 * BLK // 4096         # 4K blocks per chunk (8192)
NCHUNKS = 16
U64 = 2**64 - 1

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

ME = os.getpid()
CHILD = ME + 1_000_000           # a (fictitious) child of this process
STRANGER = ME + 2_000_000        # a process unrelated to this one

_FDS = []                        # adapter fds handed out, closed at teardown


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture(autouse=True)
def _close_adapter_fds():
    yield
    while _FDS:
        try:
            os.close(_FDS.pop())
        except OSError:
            pass


@pytest.fixture
def make():
    """make(nchunks=16, ports=(0,), **Adapter kwargs) -> (adapter, disk)."""
    made = []

    def _make(nchunks=NCHUNKS, ports=(0,), superpipe=True, **kw):
        ad = cxlflash.Adapter(**kw)
        made.append(ad)
        ad.driver.recovery_retry_delay = 0.001
        ad.driver.mailbox_retry_delay = 0.001
        w = ad.add_lun(None, size=nchunks * 65536 * BLK, block_size=BLK, ports=ports,
                       superpipe=superpipe)
        return ad, ad.open_disk(w, port=ports[0])

    yield _make
    for ad in made:
        ad.close()


@pytest.fixture
def ad(make):
    return make()


def add_disk(a, nchunks=NCHUNKS, ports=(0,), superpipe=True):
    w = a.add_lun(None, size=nchunks * 65536 * BLK, block_size=BLK, ports=ports,
                  superpipe=superpipe)
    return a.open_disk(w, port=ports[0])


def mk(cls, flags=0, **fields):
    s = cls()
    s.hdr.flags = flags
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def _snapshot(arg):
    if isinstance(arg, (ctypes.Structure, bytes, bytearray)):
        return bytes(arg)
    return None


def fails(target, req, arg, err):
    """The ioctl fails with ``err`` and leaves ``arg`` untouched."""
    before = _snapshot(arg)
    with pytest.raises(CxlFlashError) as ei:
        cxlflash.ioctl(target, req, arg)
    got = ei.value.errno
    assert got == err, (f"expected {errno.errorcode.get(err, err)}, got "
                        f"{errno.errorcode.get(got, got)}: {ei.value}")
    if before is not None:
        assert _snapshot(arg) == before, "a failed ioctl modified its argument"
    return ei.value


def as_proc(a, d, req, arg, pid, ppid=ME):
    """Issue a disk ioctl as process ``pid`` (parent ``ppid``)."""
    superpipe.disk_ioctl(a.driver, d.sdev, d, req, arg, Caller(pid, ppid))
    if req == ATTACH and not arg.hdr.flags & REUSE:
        _FDS.append(arg.adap_fd)
    return arg


def fails_as(a, d, req, arg, err, pid, ppid=ME):
    before = _snapshot(arg)
    with pytest.raises(CxlFlashError) as ei:
        superpipe.disk_ioctl(a.driver, d.sdev, d, req, arg, Caller(pid, ppid))
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}: {ei.value}"
    assert _snapshot(arg) == before
    return ei.value


def attach(d, flags=os.O_RDWR, num_interrupts=0, reuse=None):
    s = mk(uapi.dk_cxlflash_attach, flags, num_interrupts=num_interrupts)
    if reuse is not None:
        s.hdr.flags |= REUSE
        s.context_id = reuse
    cxlflash.ioctl(d, ATTACH, s)
    if reuse is None:
        _FDS.append(s.adap_fd)
    return s


def cid_of(d, **kw):
    return attach(d, **kw).context_id


def uvirtual(d, cid, size=0, flags=0):
    s = mk(uapi.dk_cxlflash_uvirtual, flags, context_id=cid, lun_size=size)
    cxlflash.ioctl(d, VIRTUAL, s)
    return s


def udirect(d, cid):
    s = mk(uapi.dk_cxlflash_udirect, context_id=cid)
    cxlflash.ioctl(d, DIRECT, s)
    return s


def resize(d, cid, h, size):
    s = mk(uapi.dk_cxlflash_resize, context_id=cid, rsrc_handle=h, req_size=size)
    cxlflash.ioctl(d, RESIZE, s)
    return s


def release(d, cid, h):
    cxlflash.ioctl(d, RELEASE, mk(uapi.dk_cxlflash_release, context_id=cid, rsrc_handle=h))


def detach(d, cid):
    cxlflash.ioctl(d, DETACH, mk(uapi.dk_cxlflash_detach, context_id=cid))


def verify_arg(cid, h, hint=0, sense=b""):
    s = mk(uapi.dk_cxlflash_verify, context_id=cid, rsrc_handle=h, hint=hint)
    s.sense_data[:len(sense)] = list(sense)
    return s


def last_lba(d, cid, h):
    s = verify_arg(cid, h)
    cxlflash.ioctl(d, VERIFY, s)
    return s.last_lba


def recover_arg(cid):
    return mk(uapi.dk_cxlflash_recover_afu, context_id=cid)


def recover(d, cid):
    s = recover_arg(cid)
    cxlflash.ioctl(d, RECOVER, s)
    if s.hdr.return_flags & uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD:
        _FDS.append(s.adap_fd)
    return s


def manage_arg(wwid, flags=0):
    s = mk(uapi.dk_cxlflash_manage_lun, flags)
    s.wwid[:] = list(wwid)
    return s


def clone_arg(src, dst):
    return mk(uapi.dk_cxlflash_clone, context_id_src=src, context_id_dst=dst)


def glun(d):
    return d.sdev.llun.parent


def ctx_of(a, cid):
    drv = a.driver
    c = drv.ctx_tbl[cid & 0xFFFFFFFF] if (cid & 0xFFFFFFFF) < 512 else None
    if c is not None and c.ctxid == cid:
        return c
    return next((c for c in drv.ctx_err_recovery if c.ctxid == cid), None)


def debug_arg(subcmd=0x04, ea=0, n=0, flags=0):
    s = mk(uapi.ht_cxlflash_afu_debug, flags, data_ea=ea, data_len=n)
    s.afu_subcmd[0] = subcmd
    return s


def provision_arg(sub, port=0, size=0, lun_id=0):
    s = mk(uapi.ht_cxlflash_lun_provision, port=port, size=size, lun_id=lun_id)
    s.hdr.subcmd = sub
    return s


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


def returns_while_context_busy(a, cid, fn):
    """Run ``fn`` while the context's mutex is held by someone else.  A
    context lookup waits for the mutex; ``fn`` finishing means the check it
    failed ran before the lookup.  Returns the thread."""
    ctx = ctx_of(a, cid)
    ctx.mutex.acquire()
    try:
        t = Bg(fn)
        t.join(1.0)
        finished = not t.is_alive()
    finally:
        ctx.mutex.release()
    t.join(5)
    assert finished, "the ioctl waited for the context: the lookup ran first"
    return t


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


def _valid_args(a, d):
    """A context with one virtual handle, a clone destination of a child,
    and a valid argument for every DK_* request (on disk ``d``)."""
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    dst = as_proc(a, d, ATTACH, mk(uapi.dk_cxlflash_attach, os.O_RDWR), CHILD).context_id
    return cid, h, {
        ATTACH: mk(uapi.dk_cxlflash_attach, os.O_RDWR),
        DIRECT: mk(uapi.dk_cxlflash_udirect, context_id=cid),
        RELEASE: mk(uapi.dk_cxlflash_release, context_id=cid, rsrc_handle=h),
        DETACH: mk(uapi.dk_cxlflash_detach, context_id=cid),
        VERIFY: verify_arg(cid, h),
        RECOVER: recover_arg(cid),
        MANAGE: manage_arg(d.wwid, ENABLE),
        VIRTUAL: mk(uapi.dk_cxlflash_uvirtual, context_id=cid, lun_size=CH),
        RESIZE: mk(uapi.dk_cxlflash_resize, context_id=cid, rsrc_handle=h, req_size=2 * CH),
        CLONE: clone_arg(cid, dst),
    }
