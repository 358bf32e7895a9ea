"""The driver model through the ioctl layer: calls per second of every
ioctl on a warm adapter (group "ioctl"), the cost per chunk of growing
a fresh vLUN with VLUN_RESIZE (group "resize per chunk"), and VLUN_CLONE of
1 M mapped chunks against ``np.copyto`` of the LXT (group "VLUN_CLONE 1M
chunks").

``benchmarks/ratios.py`` prints the calls/s and the per-chunk costs with
their max/min ratio; see ``benchmarks/README.md``.
"""
import ctypes
import os
from types import SimpleNamespace

import pytest

import cxlflash
from cxlflash import uapi
from cxlflash.bench.cases import CLONE_CHUNKS, Clone
from cxlflash.driver import superpipe
from cxlflash.driver.context import Caller
from cxlflash.driver.host import AFU_COUNTERS

CHUNK = 1 << 16                     # native blocks (and 4K blocks on a 4K LUN)
K4 = 4096
BIG_CHUNKS = (1 << 20) + 64         # a sparse memory LUN of 1 M+ chunks (256 TiB)
GROW_SIZES = {"1": 1, "1k": 1_000, "100k": 100_000, "1M": 1_000_000}
ROUNDS = {"1": 400, "1k": 400, "100k": 60, "1M": 25}

CHILD = Caller(os.getpid() + 1_000_003, os.getpid())     # a (pretend) forked child


def ioctl(d, request, arg, caller=None):
    if caller is None:
        cxlflash.ioctl(d, request, arg)
    else:
        superpipe.disk_ioctl(d.adapter.driver, d.sdev, d, request, arg, caller)
    return arg


def attach(d, reuse=None, caller=None):
    at = uapi.dk_cxlflash_attach()
    at.hdr.flags = os.O_RDWR
    if reuse is not None:
        at.hdr.flags |= uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT
        at.context_id = reuse
    return ioctl(d, uapi.DK_CXLFLASH_ATTACH, at, caller)


def uvirtual(d, cid, size=0, caller=None):
    uv = uapi.dk_cxlflash_uvirtual()
    uv.context_id = cid
    uv.lun_size = size
    return ioctl(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv, caller).rsrc_handle


def release(d, cid, h, caller=None):
    rl = uapi.dk_cxlflash_release()
    rl.context_id = cid
    rl.rsrc_handle = h
    ioctl(d, uapi.DK_CXLFLASH_RELEASE, rl, caller)


def resize(d, cid, h, size, caller=None):
    rs = uapi.dk_cxlflash_resize()
    rs.context_id = cid
    rs.rsrc_handle = h
    rs.req_size = size
    return ioctl(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs, caller).last_lba


@pytest.fixture(scope="module")
def warm():
    """An adapter with LUNs in use: a virtual LUN with open handles, a direct
    LUN, and a clone source with a child context (impersonated)."""
    a = cxlflash.Adapter()
    fds = []
    w = SimpleNamespace(a=a)
    wv = a.add_lun(None, size=64 * CHUNK * K4)
    wd = a.add_lun(None, size=64 * CHUNK * K4)
    wc = a.add_lun(None, size=64 * CHUNK * K4)
    w.wv, w.dv, w.dd, w.dc = wv, a.open_disk(wv), a.open_disk(wd), a.open_disk(wc)
    at = attach(w.dv)
    fds.append(at.adap_fd)
    w.cid = at.context_id
    attach(w.dd, reuse=w.cid)
    w.hv = uvirtual(w.dv, w.cid, CHUNK)           # keeps the LUN virtual
    w.hr = uvirtual(w.dv, w.cid, 4 * CHUNK)       # the one resized
    src = attach(w.dc)
    fds.append(src.adap_fd)
    w.src = src.context_id
    w.hc = uvirtual(w.dc, w.src, 2 * CHUNK)
    dst = attach(w.dc, caller=CHILD)
    fds.append(dst.adap_fd)
    w.dst = dst.context_id
    yield w
    for fd in fds:
        os.close(fd)
    a.close()


def run(benchmark, fn, rounds=200, iterations=25):
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


# -- calls per second of each ioctl ------------------------------------------------

@pytest.mark.benchmark(group="ioctl")
def test_ioctl_attach_detach(benchmark, warm):
    d = warm.dv

    def pair():
        at = attach(d)
        dt = uapi.dk_cxlflash_detach()
        dt.context_id = at.context_id
        ioctl(d, uapi.DK_CXLFLASH_DETACH, dt)
        os.close(at.adap_fd)                      # APP_CLOSE_ADAP_FD

    run(benchmark, pair)
    assert warm.a.driver.ctx_tbl[3] is None          # PEs 0-2 are the fixture's


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_user_direct_release(benchmark, warm):
    d, cid = warm.dd, warm.cid

    def pair():
        ud = uapi.dk_cxlflash_udirect()
        ud.context_id = cid
        release(d, cid, ioctl(d, uapi.DK_CXLFLASH_USER_DIRECT, ud).rsrc_handle)

    run(benchmark, pair)


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_user_virtual_release(benchmark, warm):
    d, cid = warm.dv, warm.cid
    run(benchmark, lambda: release(d, cid, uvirtual(d, cid, 0)))


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_resize_grow_shrink(benchmark, warm):
    d, cid, h = warm.dv, warm.cid, warm.hr

    def pair():
        resize(d, cid, h, 5 * CHUNK)
        resize(d, cid, h, 4 * CHUNK)

    run(benchmark, pair)
    assert resize(d, cid, h, 4 * CHUNK) == 4 * CHUNK - 1


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_verify(benchmark, warm):
    d, cid, h = warm.dv, warm.cid, warm.hv

    def one():
        vf = uapi.dk_cxlflash_verify()
        vf.context_id = cid
        vf.rsrc_handle = h
        return ioctl(d, uapi.DK_CXLFLASH_VERIFY, vf).last_lba

    run(benchmark, one)
    assert one() == CHUNK - 1


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_recover_afu_healthy(benchmark, warm):
    d, cid = warm.dv, warm.cid

    def one():
        ra = uapi.dk_cxlflash_recover_afu()
        ra.context_id = cid
        return ioctl(d, uapi.DK_CXLFLASH_RECOVER_AFU, ra).hdr.return_flags

    run(benchmark, one)
    assert one() == 0


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_manage_lun(benchmark, warm):
    d, wwid = warm.dv, warm.wv

    def one():
        ml = uapi.dk_cxlflash_manage_lun()
        ml.wwid[:] = wwid
        ml.hdr.flags = uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE
        ioctl(d, uapi.DK_CXLFLASH_MANAGE_LUN, ml)

    run(benchmark, one)


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_clone_release(benchmark, warm):
    d, src, dst, h = warm.dc, warm.src, warm.dst, warm.hc
    alloc = warm.a.driver.gluns[d.wwid].allocator

    def pair():
        cl = uapi.dk_cxlflash_clone()
        cl.context_id_src = src
        cl.context_id_dst = dst
        ioctl(d, uapi.DK_CXLFLASH_VLUN_CLONE, cl, CHILD)
        release(d, dst, h, CHILD)

    run(benchmark, pair)
    assert alloc.clone_count(0) == 0


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_lun_provision_query(benchmark, warm):
    a = warm.a

    def one():
        lp = uapi.ht_cxlflash_lun_provision()
        lp.hdr.subcmd = uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_QUERY_PORT
        cxlflash.ioctl(a, uapi.HT_CXLFLASH_LUN_PROVISION, lp)
        return lp.max_num_luns

    run(benchmark, one)


@pytest.mark.benchmark(group="ioctl")
def test_ioctl_afu_debug(benchmark, warm):
    a = warm.a
    buf = ctypes.create_string_buffer(48)

    def one():
        ad = uapi.ht_cxlflash_afu_debug()
        ad.afu_subcmd[0] = AFU_COUNTERS
        ad.data_ea = ctypes.addressof(buf)
        ad.data_len = len(buf)
        cxlflash.ioctl(a, uapi.HT_CXLFLASH_AFU_DEBUG, ad)

    run(benchmark, one)
    assert any(buf.raw)


# -- VLUN_RESIZE: cost per chunk of growing a fresh vLUN -------------------------------------

@pytest.fixture(scope="module")
def big():
    """A 1 M+-chunk LUN (sparse memory) and a context attached to it."""
    a = cxlflash.Adapter()
    wwid = a.add_lun(None, size=BIG_CHUNKS * CHUNK * K4)
    d = a.open_disk(wwid)
    at = attach(d)
    yield SimpleNamespace(a=a, d=d, cid=at.context_id, wwid=wwid, handle=[None])
    os.close(at.adap_fd)
    a.close()


@pytest.mark.benchmark(group="resize per chunk")
@pytest.mark.parametrize("size", list(GROW_SIZES))
def test_resize_grow(benchmark, big, size):
    """One VLUN_RESIZE from 0 to ``n`` chunks of a freshly opened vLUN (the
    LUN's allocator is fresh too: the previous vLUN, its only user, was
    released in the untimed setup)."""
    n = GROW_SIZES[size]
    d, cid, slot = big.d, big.cid, big.handle
    benchmark.extra_info["chunks"] = n

    def setup():
        if slot[0] is not None:
            release(d, cid, slot[0])
        slot[0] = uvirtual(d, cid, 0)
        return (d, cid, slot[0], n * CHUNK), {}

    last = benchmark.pedantic(resize, setup=setup, rounds=ROUNDS[size], warmup_rounds=1)
    assert last == n * CHUNK - 1
    release(d, cid, slot[0])
    slot[0] = None


# -- VLUN_CLONE of 1 M mapped chunks vs np.copyto of the LXT --------------------------------
#
# The workload of cxlflash.bench.cases.Clone (the same one ``cxlflash
# bench`` times in its matrix): the ioctl the product runs, issued the way
# a program issues it, ``cxlflash.ioctl(disk, DK_CXLFLASH_VLUN_CLONE,
# uapi.dk_cxlflash_clone)``, by this process, from a context owned by its
# parent (the source: one vLUN of 1 M mapped chunks) into a context of its
# own.  The source is set up (untimed) through the driver entry point as
# our parent, so the timed call is the public one with the real caller.
# Undone between rounds (untimed) by RELEASE of the clone.  Interleaved
# round by round with the baseline, np.copyto of the 1 M-entry LXT (8 MB)
# into a preallocated array.


@pytest.fixture(scope="module")
def clone_setup():
    case = Clone(CLONE_CHUNKS)
    yield case
    case.close()


@pytest.mark.benchmark(group="VLUN_CLONE 1M chunks")
def test_vlun_clone_1m(interleaved, clone_setup):
    c = clone_setup
    # The clone maps the same chunks, each with one clone reference.
    c.check()
    interleaved([("clone", c.clone), ("copyto", c.copyto)],
                rounds=15, warmup_rounds=1, ops=CLONE_CHUNKS)
    c.check_released()
