"""Physical LUNs on Ceph RBD images (issue 15): naming, the data path on
embedded and connected adapters, VERIFY's capacity refresh after `rbd
resize`, and the CLI (`cxlflash serve --lun`, `cxlflash nbd --target`).

Every test runs against the throw-away cluster of ``ceph.py`` (started once
per session, on first use).  The exclusive lock between two daemons and the
OSD faults are in ``test_rbd_faults.py``; the build (librbd or not) in
``test_rbd_build.py``."""
import asyncio
import errno
import subprocess
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cxlflash
from cxlflash.errors import CxlFlashError

from api_fixtures import adapter  # noqa: F401 (fixture)
from block_pattern import BS, CHUNK, pattern
from ceph import GIB, MIB
from nbd_servers import NbdProcess, subprocess_env
from scsi_sense import fixed_sense

from driver.helpers import attach, close_open_fds, udirect, verify


@pytest.fixture(autouse=True)
def _close_adapter_fds():
    """The adapter fds ATTACH handed out (``driver.helpers.attach``)."""
    yield
    close_open_fds()


def add(a, lun, **kw):
    """add_lun + open_disk: the Disk."""
    return a.open_disk(a.add_lun(lun, **kw))


def errno_of(fn):
    with pytest.raises(OSError) as e:
        fn()
    assert str(e.value.strerror or "").strip(), f"no message: {e.value!r}"
    return e.value


# -- naming ---------------------------------------------------------------------------


MALFORMED = [
    "rbd:",                             # nothing
    "rbd:img",                          # no pool
    "rbd:/img",                         # empty pool
    "rbd:rbd/",                         # empty image
    "rbd:rbd/img?",                     # an empty option list
    "rbd:rbd/img?conf",                 # no "="
    "rbd:rbd/img?conf=",                # an empty path
    "rbd:rbd/img?id=",                  # an empty id
    "rbd:rbd/img?colour=blue",          # an unknown key
    "rbd:rbd/img?timeout=0",            # timeouts: > 0, a number, finite
    "rbd:rbd/img?timeout=-1",
    "rbd:rbd/img?timeout=abc",
    "rbd:rbd/img?timeout=",
    "rbd:rbd/img?timeout=nan",
    "rbd:rbd/img?timeout=inf",
    "rbd:rbd/img?timeout=1e999",
    "rbd:rbd/img?timeout=99999999999999999999999",
    "rbd:rb\0d/img",                    # NULs
    "rbd:rbd/im\0g",
    "rbd:rbd/img?id=ad\0min",
    "rbd:" + "p" * 9000 + "/img",       # extreme lengths (a daemon request holds 64 KiB)
    "rbd:rbd/" + "i" * 60_000,
    "rbd:rbd/img?id=" + "x" * 60_000,
]


@pytest.mark.parametrize("name", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_names_are_einval(adapter, ceph, name):
    if "conf=" not in name and "?" not in name:
        name += f"?conf={ceph.conf}&timeout=5"
    elif "conf=" not in name:
        name += f"&conf={ceph.conf}"
    t0 = time.monotonic()
    e = errno_of(lambda: adapter.add_lun(name))
    assert e.errno == errno.EINVAL, (name[:80], e)
    assert time.monotonic() - t0 < 5, "a malformed name must be refused before connecting"
    assert adapter.luns() == []


def test_name_longer_than_a_daemon_request_is_einval(adapter, ceph):
    """100 000 characters: more than a request to a daemon may hold (64 KiB):
    still EINVAL, and the connection (and the daemon) stay."""
    e = errno_of(lambda: adapter.add_lun(f"rbd:rbd/{'i' * 100_000}?conf={ceph.conf}"))
    assert e.errno == errno.EINVAL, e
    assert adapter.luns() == []


# Text after a valid prefix that makes it malformed: a NUL somewhere, an
# unknown key, a timeout that is not a positive finite number of seconds.
_keys = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=12) \
    .filter(lambda k: k not in ("conf", "id", "timeout"))
_bad_timeouts = st.one_of(
    st.integers(max_value=0).map(str),
    st.text(st.characters(blacklist_characters="&"), max_size=20).filter(
        lambda s: not _positive_number(s)),
    st.sampled_from(["nan", "-inf", "inf", "1e400", "0x10", "3s", "-0", "0.0"]),
)


def _positive_number(s):
    """What a timeout may be: a positive, finite number of seconds."""
    try:
        v = float(s)
    except ValueError:
        return False
    return 0 < v < float("inf")


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["nul", "key", "timeout"]), key=_keys, junk=_bad_timeouts,
       where=st.integers(min_value=4, max_value=200))
def test_fuzzed_malformed_names_are_einval(ceph_cluster, how, key, junk, where):
    good = ceph_cluster.lun("img", timeout=5)
    if how == "nul":
        where = min(where, len(good))
        name = good[:where] + "\0" + good[where:]
    elif how == "key":
        name = good + f"&{key}=1"
    else:
        name = good.replace("timeout=5", "timeout=" + junk)
    with cxlflash.Adapter() as a:
        e = errno_of(lambda: a.add_lun(name))
        assert e.errno == errno.EINVAL, (name[:120], e)


def test_missing_image_and_pool_are_enoent(adapter, ceph):
    e = errno_of(lambda: adapter.add_lun(ceph.lun("no-such-image")))
    assert e.errno == errno.ENOENT and "no-such-image" in str(e), e
    e = errno_of(lambda: adapter.add_lun(ceph.lun("img", pool="no-such-pool")))
    assert e.errno == errno.ENOENT and "no-such-pool" in str(e), e
    assert adapter.luns() == []


def test_unreachable_cluster_is_etimedout_in_bounded_time(adapter, ceph, tmp_path):
    # A conf naming a monitor port nobody listens on.
    s = socket_port_nobody_listens_on()
    conf = tmp_path / "dead.conf"
    text = open(ceph.conf).read()
    text = text.replace(f"127.0.0.1:{ceph.port}", f"127.0.0.1:{s}")
    assert f"127.0.0.1:{s}" in text
    conf.write_text(text)
    t0 = time.monotonic()
    e = errno_of(lambda: adapter.add_lun(f"rbd:rbd/img?conf={conf}&id=admin&timeout=2"))
    took = time.monotonic() - t0
    assert e.errno == errno.ETIMEDOUT, e
    assert took < 2 + 8, f"ETIMEDOUT after {took:.1f} s with timeout=2"
    assert adapter.luns() == []


def socket_port_nobody_listens_on():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_missing_conf_file_is_enoent(adapter, tmp_path):
    e = errno_of(lambda: adapter.add_lun(f"rbd:rbd/img?conf={tmp_path}/none.conf&timeout=2"))
    assert e.errno == errno.ENOENT and "none.conf" in str(e), e


def test_capacity_is_the_image_size(adapter, ceph):
    name, lun = ceph.image(GIB)
    d = add(adapter, lun)
    at = attach(d)
    assert at.last_lba == GIB // BS - 1
    assert at.block_size == BS


# -- the data path ---------------------------------------------------------------------


@pytest.fixture
def rbd_disk(adapter, ceph):
    """A Disk on a fresh 1 GiB image (4 chunks; the tests write little)."""
    name, lun = ceph.image(GIB)
    d = add(adapter, lun)
    d.image = name
    yield d


@pytest.fixture
def rbd_vlun(rbd_disk):
    with rbd_disk.attach() as c, c.create_virtual(1000) as v:
        yield v


def test_write_read_unmap(rbd_vlun):
    v = rbd_vlun
    assert v.write(0, pattern(0, 10)) == 10
    assert v.read(0, 10) == pattern(0, 10).tobytes()
    assert v.unmap(2, 3) == 3
    got = v.read(0, 10)
    assert got[2 * BS:5 * BS] == bytes(3 * BS)
    assert got[:2 * BS] == pattern(0, 2).tobytes()
    assert got[5 * BS:] == pattern(5, 5).tobytes()
    # Unaligned to RBD's discard granularity (64 KiB) and a lone block: zeros too.
    v.write(100, pattern(100, 40, seed=3))
    assert v.write_zeroes(101, 1) == 1
    assert v.discard(117, 5) == 5
    got = v.read(100, 40)
    want = bytearray(pattern(100, 40, seed=3).tobytes())
    want[1 * BS:2 * BS] = bytes(BS)
    assert got[:17 * BS] == want[:17 * BS]          # discard need not zero; the rest is intact
    assert got[22 * BS:] == want[22 * BS:]
    v.flush()
    assert v.stats()["num_errors"] == 0


def test_io_past_the_end_of_the_vlun_is_einval(rbd_vlun):
    with pytest.raises(CxlFlashError) as e:
        rbd_vlun.read(1000, 1)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("scrub", [True, False])
def test_chunk_scrub_after_shrink_reads_zeros(adapter, ceph, rbd_disk, scrub):
    with rbd_disk.attach() as c, c.create_virtual(CHUNK, scrub=scrub) as v:
        v.write(0, pattern(0, 8, seed=5))
        v.write(CHUNK - 4, pattern(CHUNK - 4, 4, seed=5))
        plba = int(v.translate([0])[0])
        v.set_size(0, release=True)             # the chunk is freed (and scrubbed)
        assert v.chunks == 0
        # What is on the image where the chunk was, read through another
        # adapter's direct LUN (direct access is shared).
        with cxlflash.Adapter() as b:
            d = b.open_disk(b.add_lun(ceph.lun(rbd_disk.image)))
            with d.attach() as c2, c2.open_direct() as direct:
                head, tail = direct.read(plba, 8), direct.read(plba + CHUNK - 4, 4)
        if scrub:
            assert head == bytes(8 * BS) and tail == bytes(4 * BS)
        else:                                   # the contrast: the check above can fail
            assert head == pattern(0, 8, seed=5).tobytes()
            assert tail == pattern(CHUNK - 4, 4, seed=5).tobytes()
        v.set_size(CHUNK)
        if scrub:
            assert v.read(0, 8) == bytes(8 * BS)


def test_direct_lun_sees_the_image_bytes(adapter, ceph, rbd_disk, tmp_path):
    with rbd_disk.attach() as c, c.open_direct() as d:
        d.write(1234, pattern(1234, 3, seed=9))
        d.flush()
    out = tmp_path / "part"
    # The image as `rbd export` reads it (mostly holes: quick), blocks 1234-1236.
    p = subprocess.run(
        f"rbd -c {ceph.conf} export --no-progress rbd/{rbd_disk.image} - | "
        f"dd bs=4096 skip=1234 count=3 status=none of={out}",
        shell=True, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == pattern(1234, 3, seed=9).tobytes()


def test_listio(rbd_vlun):
    v = rbd_vlun
    rng = np.random.default_rng(1)
    nb = rng.integers(1, 8, size=40)
    lbas = np.arange(40) * 20 + rng.integers(0, 10, size=40)
    wbuf = np.concatenate([pattern(lb, n, seed=7) for lb, n in zip(lbas.tolist(), nb.tolist())])
    res = v.listio(np.full(40, cxlflash.LIST_WRITE), lbas, nb, wbuf)
    assert res.ok and res.status.tolist() == nb.tolist()
    rbuf = np.zeros_like(wbuf)
    res = v.listio(np.full(40, cxlflash.LIST_READ), lbas, nb, rbuf)
    assert res.ok and np.array_equal(rbuf, wbuf)
    # A request past the vLUN's end fails alone.
    res = v.listio(np.full(2, cxlflash.LIST_READ), np.array([0, 999]), np.array([1, 5]),
                   np.zeros(6 * BS, np.uint8))
    assert res.status[0] == 1 and res.status[1] < 0
    assert res.error(1).errno == errno.EINVAL


def test_futures_and_asyncio(rbd_vlun):
    v = rbd_vlun
    futs = [v.awrite(i * 3, pattern(i * 3, 3)) for i in range(20)]
    assert [f.result(30) for f in futs] == [3] * 20
    reads = [v.aread(i * 3, 3) for i in range(20)]
    for i, f in enumerate(reads):
        assert f.result(30) == pattern(i * 3, 3).tobytes()
    v.aflush().result(30)
    assert v.awrite_zeroes(0, 3).result(30) == 3
    assert v.read(0, 3) == bytes(3 * BS)

    async def main():
        await asyncio.gather(*(v.write_async(500 + i, pattern(500 + i, 1, seed=2))
                               for i in range(16)))
        return await asyncio.gather(*(v.read_async(500 + i, 1) for i in range(16)))

    got = asyncio.run(main())
    assert [bytes(g) for g in got] == [pattern(500 + i, 1, seed=2).tobytes() for i in range(16)]


def test_two_luns_on_two_images(adapter, ceph):
    disks = [add(adapter, ceph.image(GIB)[1]) for _ in range(2)]
    assert len(set(adapter.luns())) == 2
    with disks[0].attach() as c:
        c.attach_disk(disks[1])
        a = c.create_virtual(10)
        b = c.create_virtual(10, disk=disks[1])
        a.write(0, pattern(0, 1, seed=1))
        b.write(0, pattern(0, 1, seed=2))
        assert a.read(0, 1) == pattern(0, 1, seed=1).tobytes()
        assert b.read(0, 1) == pattern(0, 1, seed=2).tobytes()


def test_closing_the_adapter_closes_the_image(ceph):
    name, lun = ceph.image(GIB)
    a = cxlflash.Adapter()
    with a.open_disk(a.add_lun(lun)).attach() as c, c.create_virtual(10) as v:
        v.write(0, pattern(0, 1))
    assert not ceph.remove(name)                # open: "image still has watchers"
    a.close()
    # No watcher left (and no lock): the image can be removed at once.
    assert ceph.remove(name)
    ceph.images.remove(name)


# -- VERIFY after `rbd resize` (spec §15) -------------------------------------------------


def test_resize_behind_the_driver_seen_through_verify(adapter, ceph):
    name, lun = ceph.image(256 * MIB)
    d = add(adapter, lun)
    at = attach(d)
    cid = at.context_id
    assert at.last_lba == 256 * MIB // BS - 1
    h = udirect(d, cid).rsrc_handle
    assert verify(d, cid, h).last_lba == 256 * MIB // BS - 1
    ceph.resize(name, 512 * MIB)
    assert ceph.size(name) == 512 * MIB
    # Without sense data VERIFY re-reads nothing; with the unit attention
    # "capacity data has changed" it refreshes.
    assert verify(d, cid, h).last_lba == 256 * MIB // BS - 1
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A, 0x09)).last_lba == 512 * MIB // BS - 1
    assert attach(d).last_lba == 512 * MIB // BS - 1
    # The new blocks are there to write.
    with d.attach() as c, c.open_direct() as direct:
        top = 512 * MIB // BS - 1
        direct.write(top, pattern(top, 1))
        assert direct.read(top, 1) == pattern(top, 1).tobytes()


def test_grown_image_gives_more_chunks(adapter, ceph):
    name, lun = ceph.image(256 * MIB)          # one chunk
    d = add(adapter, lun)
    with d.attach() as c:
        v = c.create_virtual(CHUNK)
        with pytest.raises(CxlFlashError) as e:
            v.set_size(2 * CHUNK)
        assert e.value.errno == errno.EINVAL      # beyond the physical LUN
        ceph.resize(name, 512 * MIB)
        # VERIFY of a vLUN answers the vLUN's last LBA; the LUN's is ATTACH's.
        assert verify(d, c.context_id, v.handle,
                      fixed_sense(0x6, 0x2A, 0x09)).last_lba == CHUNK - 1
        assert attach(d).last_lba == 512 * MIB // BS - 1
        v.close()
        # The allocator is rebuilt, from the new capacity, when the LUN's
        # last vLUN is gone (as the kernel's is).
        with c.create_virtual(2 * CHUNK) as v:
            v.write(2 * CHUNK - 1, pattern(0, 1))
            assert v.read(2 * CHUNK - 1, 1) == pattern(0, 1).tobytes()


# -- the CLI -------------------------------------------------------------------------------


def test_serve_lun_rbd(ceph, tmp_path):
    import daemon_process
    name, lun = ceph.image(GIB)
    with daemon_process.start(tmp_path, "--lun", lun) as dp:
        a = dp.connect()
        try:
            [w] = a.luns()
            with a.open_disk(w).attach() as c, c.create_virtual(100) as v:
                v.write(7, pattern(7, 2))
                assert v.read(7, 2) == pattern(7, 2).tobytes()
                st = a.status()
                [lu] = [x for x in st["luns"] if x["wwid"] == w.hex()]
                assert lu["mode"] == "virtual"
        finally:
            a.close()


def test_nbd_target_rbd_nbdcopy_in_and_out(ceph, tmp_path):
    name, lun = ceph.image(256 * MIB)
    src = tmp_path / "src"
    src.write_bytes(np.random.default_rng(3).integers(0, 256, 64 * MIB, np.uint8).tobytes())
    out = tmp_path / "out"
    with NbdProcess(tmp_path, ["a=64M"], target=lun) as s:
        for args in (["nbdcopy", str(src), s.uri("a")], ["nbdcopy", s.uri("a"), str(out)]):
            p = subprocess.run(args, capture_output=True, text=True, timeout=300,
                               env=subprocess_env())
            assert p.returncode == 0, p.stderr + s.log()
    assert out.stat().st_size == 64 * MIB
    assert out.read_bytes() == src.read_bytes()

