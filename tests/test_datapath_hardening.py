"""Issue 8 at the data path's level (``_core.datapath``, ``_core.pattern``).

Every transfer, zeroing and unmap checks its whole range (overflow-safe,
byte offsets within ``off_t``) before any byte moves; buffers are never
addressed outside themselves; integer arguments are checked before any
allocation (``OSError(EINVAL)`` out of range, ``TypeError`` for a
non-integer); a forked child's ``listio`` recovers from its owner's AFU
reset like ``readinto``; a backing store that ended says so.

Each test here failed on main before the fix (the ones that crashed main
with a wild write or SIGFPE run the call in a forked child).
"""
import errno
import os
import resource
import signal

import numpy as np
import pytest

from cxlflash._core import pattern
from cxlflash._core.datapath import (DataPath, LIST_READ, LIST_UNMAP, LIST_WRITE,
                                     afu_command, scrub_chunks)
from cxlflash._core.rawio import raw_io
from cxlflash._core.errors import AdapterResetError, AfuError
from cxlflash._core.tables import ResourceTable

from forking import in_child

BS = 4096
CHUNK = 1 << 16                 # blocks per chunk
U64 = 2 ** 64
ZERO_PUNCH, ZERO_WRITE = 0, 2


def lxt_entry(aun, perms=3):
    return (aun << 16) | (0 << 8) | (perms << 4) | 1


def blocks(lba, n, bs=BS):
    """Distinct content for blocks lba..lba+n-1."""
    out = np.empty((n, bs // 8), dtype=np.uint64)
    out[:] = (np.arange(lba, lba + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
              )[:, None] + np.arange(bs // 8, dtype=np.uint64)
    return out.tobytes()


@pytest.fixture
def fd(tmp_path):
    f = os.open(tmp_path / "backing", os.O_RDWR | os.O_CREAT, 0o600)
    yield f
    os.close(f)


def virtual(fd, auns, perms=None, bs=BS, **kw):
    """A table whose handle 0 is a vLUN over chunks ``auns``."""
    t = ResourceTable(4)
    perms = perms or [3] * len(auns)
    t.load_slot(0, 0, 3, 16, lxt=[lxt_entry(a, p) for a, p in zip(auns, perms)])
    return t, DataPath(t, 0, fd, bs, **kw)


def direct(fd, last_lba, bs=BS, **kw):
    t = ResourceTable(4)
    h = t.open_direct(3, 0x10, 1, last_lba)
    return t, DataPath(t, h, fd, bs, **kw)


def pread(fd, lba, n, bs=BS):
    return os.pread(fd, n * bs, lba * bs).ljust(n * bs, b"\0")


# -- item 2: whole range checked before any byte moves --------------------------------

def test_direct_unmap_with_a_wrapping_range_zeroes_nothing(tmp_path):
    # lba + nblocks - 1 wraps to block 0, which is inside the 16-block LUN:
    # main zeroed from block 4 on, writing zeros until the file-size limit.
    def run():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        f = os.open(tmp_path / "lun", os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(f, blocks(0, 16), 0)
        _, dp = direct(f, 15, zero_mode=ZERO_WRITE)
        try:
            dp.unmap(4, U64 - 3)
            outcome = "done"
        except OSError as e:
            outcome = (e.errno, str(e))
        return outcome, os.fstat(f).st_size, pread(f, 0, 16) == blocks(0, 16)
    outcome, size, intact = in_child(run)
    assert outcome[0] == errno.EINVAL and "2**64-1" in outcome[1]
    assert size == 16 * BS and intact


def test_vlun_unmap_with_a_wrapping_range_zeroes_nothing(fd):
    # The last block wraps into chunk 0: main zeroed chunks 0 and 1 and
    # only then refused 0x13 at chunk 2.
    t, dp = virtual(fd, [0, 1])
    data = blocks(CHUNK - 4, 8)
    dp.write(CHUNK - 4, data)
    with pytest.raises(OSError) as e:
        dp.unmap(10, U64 - 5)
    assert e.value.errno == errno.EINVAL
    assert dp.read(CHUNK - 4, 8) == data
    st, _ = dp.listio([LIST_UNMAP], [10], np.array([U64 - 5], np.uint64),
                      bytearray(0), [0])
    assert st[0] == -errno.EINVAL
    assert dp.read(CHUNK - 4, 8) == data


def test_transfer_checks_every_chunk_before_the_first_byte(fd):
    # Chunk 2 (of 0..3) is read-only: main checked only the first and the
    # last block, so it wrote chunk 0 (unmap: zeroed chunks 0 and 1) before
    # refusing 0x15.
    bs = 512
    _, dp = virtual(fd, [0, 5, 3, 7], perms=[3, 3, 1, 3], bs=bs)
    marks = [CHUNK - 2, 5 * CHUNK]                 # physical blocks of chunks 0, 1
    for p in marks:
        os.pwrite(fd, blocks(p, 2, bs), p * bs)
    with pytest.raises(AfuError) as e:
        dp.write(CHUNK - 2, bytes((2 * CHUNK + 4) * bs))
    assert e.value.afu_rc == 0x15
    with pytest.raises(AfuError) as e:
        dp.unmap(CHUNK - 2, 2 * CHUNK + 4)
    assert e.value.afu_rc == 0x15
    st, cd = dp.listio([LIST_UNMAP], [0], [3 * CHUNK], bytearray(0), [0])
    assert (st[0], cd[0]) == (-1000, 0x15)
    for p in marks:
        assert pread(fd, p, 2, bs) == blocks(p, 2, bs)


def test_a_split_request_is_checked_whole_before_the_first_command(fd):
    # max_xfer splits 16 blocks into two commands; the second is beyond
    # the one-chunk vLUN: main issued the first.
    _, dp = virtual(fd, [0], max_xfer=8)
    dp.write(CHUNK - 8, blocks(0, 8))
    with pytest.raises(AfuError) as e:
        dp.write(CHUNK - 8, blocks(100, 16))
    assert e.value.afu_rc == 0x13 and "LBA 65536" in str(e.value)
    assert dp.read(CHUNK - 8, 8) == blocks(0, 8)
    with pytest.raises(AfuError):
        dp.readinto(CHUNK - 8, bytearray(16 * BS))
    assert dp.get_stats()["blocks_written"] == 8


def test_byte_offsets_beyond_off_t_are_refused_not_wrapped(fd):
    # A direct LUN of 2**60 blocks: block 2**52 starts at byte 2**64, which
    # main wrapped to byte 0 and read / overwrote block 0.
    _, dp = direct(fd, 2 ** 60)
    dp.write(0, blocks(0, 1))
    for call in (lambda: dp.read(2 ** 52, 1), lambda: dp.write(2 ** 52, blocks(9, 1)),
                 lambda: dp.unmap(2 ** 52, 1),
                 lambda: dp.readinto(2 ** 51 - 1, bytearray(BS))):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL and "off_t" in str(e.value)
    with pytest.raises(OSError) as e:                   # the last block that fits
        dp.readinto(2 ** 51 - 2, bytearray(BS))          # reaches the (short) file
    assert e.value.errno == errno.EIO
    assert pread(fd, 0, 1) == blocks(0, 1)


def test_vlun_chunk_beyond_off_t_is_refused_not_wrapped(fd):
    # Chunk 2**36 of 4 KiB blocks starts at byte 2**64: main addressed byte 0.
    t, dp = virtual(fd, [2 ** 36])
    os.pwrite(fd, blocks(0, 2), 0)
    with pytest.raises(OSError) as e:
        dp.write(0, blocks(5, 1))
    assert e.value.errno == errno.EINVAL and "off_t" in str(e.value)
    with pytest.raises(OSError):
        dp.unmap(0, 2)
    with pytest.raises(OSError):
        afu_command(t, 0, fd, BS, 0, blocks(5, 1), write=True)
    st, _ = dp.listio([LIST_READ, LIST_UNMAP], [0, 0], [1, 1], bytearray(BS), [0, 0])
    assert list(st) == [-errno.EINVAL, -errno.EINVAL]
    assert pread(fd, 0, 2) == blocks(0, 2)
    # A chunk whose physical LBAs pass 2**63 cannot even be mapped (main
    # mapped it, and a read through it failed as "AFU rc 0x00").
    with pytest.raises(ValueError, match="below 2[*][*]63"):
        virtual(fd, [2 ** 47 + 1])


def test_scrub_refuses_chunks_beyond_off_t_before_zeroing_any(fd):
    # aun 2**36 * 256 MiB wrapped to byte 0: main scrubbed chunk 0.
    os.pwrite(fd, blocks(0, 4), 0)
    with pytest.raises(OSError) as e:
        scrub_chunks(fd, ZERO_PUNCH, [1, 2 ** 36], BS)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        scrub_chunks(fd, ZERO_PUNCH, [-1], BS)
    assert e.value.errno == errno.EINVAL
    assert pread(fd, 0, 4) == blocks(0, 4)


# -- item 3: buffers, lengths and sizes ------------------------------------------------

@pytest.mark.parametrize("bad_fd", [2**31, -2, 2**64])
def test_raw_io_fd_out_of_range_is_einval(bad_fd):
    """An fd outside what a file descriptor can be is EINVAL naming it (it
    was OverflowError), before any byte moves."""
    buf = bytearray(b"\x5a" * BS)
    with pytest.raises(OSError) as e:
        raw_io(bad_fd, [1], [0], BS, buf)
    assert e.value.errno == errno.EINVAL and "fd" in str(e.value)
    assert buf == bytearray(b"\x5a" * BS)


def test_raw_io_wrapping_buffer_offset_is_refused(fd):
    # boff + nbytes wrapped to 0 and passed main's check: it wrote the
    # 4 KiB before the buffer into the file.
    os.pwrite(fd, blocks(0, 1), 0)
    buf = bytearray(2 * BS)
    with pytest.raises(ValueError):
        raw_io(fd, [2], [0], BS, buf, buf_offsets=np.array([U64 - BS], np.uint64))
    with pytest.raises(OSError) as e:
        raw_io(fd, [2], [0], U64 - 1, buf)
    assert e.value.errno == errno.EINVAL and "nbytes" in str(e.value)
    with pytest.raises(ValueError):
        raw_io(fd, [2], [0], 3 * BS, buf)
    assert pread(fd, 0, 1) == blocks(0, 1)


def test_pattern_fill_with_a_wrapping_offset_or_short_arrays_writes_nothing():
    def run():
        buf = bytearray(2 * BS)
        out = []
        for kw in (dict(lbas=[0], seqs=[1], buf_offsets=[U64 - BS]),
                   dict(lbas=[0, 1], seqs=[1]),
                   dict(lbas=[0, 1], seqs=[1, 1], buf_offsets=[0])):
            try:
                pattern.fill(buf, block_size=BS, **kw)
                out.append("filled")
            except (ValueError, OSError) as e:
                out.append(str(e))
        return out, bytes(buf) == bytes(2 * BS)
    msgs, untouched = in_child(run)
    assert "does not fit" in msgs[0]
    assert "seqs" in msgs[1] and "buf_offsets" in msgs[2]
    assert untouched


def test_pattern_refuses_wrapping_sizes_and_bad_block_sizes():
    def run():
        buf = bytearray(8 * BS)
        out = []
        for call in (lambda: pattern.verify(buf, 0, [1] * 8, 2 ** 61),
                     lambda: pattern.fill(buf, [0], [1], 2 ** 61, nblocks=8),
                     lambda: pattern.fill(buf, [0], [1], BS, nblocks=2 ** 52 + 1),
                     lambda: pattern.verify(buf, U64 - 1, [1, 1], BS),
                     lambda: pattern.verify(buf, 0, [1], 0)):
            try:
                call()
                out.append(None)
            except (ValueError, OSError) as e:
                kind = "OSError" if isinstance(e, OSError) else type(e).__name__
                out.append((kind, getattr(e, "errno", None)))
        return out
    out = in_child(run)
    assert out == [("OSError", errno.EINVAL), ("OSError", errno.EINVAL),
                   ("ValueError", None), ("OSError", errno.EINVAL),
                   ("OSError", errno.EINVAL)]


def test_afu_command_with_block_size_0_is_einval_not_sigfpe(fd):
    def run():
        t, _ = direct(fd, 15)
        out = []
        for bs in (0, 100, -512, 2 ** 32):
            try:
                afu_command(t, 0, fd, bs, 0, bytearray(BS))
            except OSError as e:
                out.append((e.errno, "block_size" in str(e)))
        return out
    assert in_child(run) == [(errno.EINVAL, True)] * 4


def test_read_of_an_absurd_size_is_refused_before_allocating(fd):
    # Direct: 2**52 + 1 blocks of 4 KiB is 4 KiB modulo 2**64; main
    # returned 4096 bytes.
    _, dp = direct(fd, 2 ** 60)
    with pytest.raises(OSError) as e:
        dp.read(0, 2 ** 52 + 1)
    assert e.value.errno == errno.EINVAL
    # A vLUN: refused as the AFU refuses it, before the 1 EiB buffer
    # (main: MemoryError, or 4096 bytes for 2**52 + 1).
    _, dp = virtual(fd, [0])
    for n in (2 ** 48, 2 ** 52 + 1):
        with pytest.raises(AfuError) as e:
            dp.read(0, n)
        assert e.value.afu_rc == 0x13 and "LBA 65536" in str(e.value)
    # A range that passes LBA 2**64-1 never reaches the table.
    with pytest.raises(OSError) as e:
        dp.read(U64 - 1, 2)
    assert e.value.errno == errno.EINVAL and "2**64-1" in str(e.value)
    # A logical size: EINVAL naming the range, before allocating.
    dp.limit = 100
    with pytest.raises(OSError) as e:
        dp.read(1914, 2 ** 48)
    assert e.value.errno == errno.EINVAL and "logical size of 100" in str(e.value)


# -- item 6: listio recovers a replica whose owner reset the AFU ---------------------

def _replica(fd):
    """A vLUN table following a reset epoch, as a forked child's replica."""
    t, dp = virtual(fd, [0])
    epoch = np.zeros(1, dtype=np.uint64)
    t.watch_epoch(epoch, 0)
    calls = []

    def recover():
        calls.append(int(epoch[0]))
        t.watch_epoch(epoch, int(epoch[0]))      # a fresh snapshot of the owner
        return True
    dp.on_reset = recover
    return t, dp, epoch, calls


def test_listio_recovers_when_the_epoch_moved(fd):
    t, dp, epoch, calls = _replica(fd)
    dp.write(0, blocks(0, 2))
    epoch[0] = 1                                  # the owner reset the AFU
    buf = bytearray(2 * BS)
    st, _ = dp.listio([LIST_READ, LIST_READ], [0, 1], [1, 1], buf, [0, BS])
    assert list(st) == [1, 1] and calls == [1]    # main: [-1001, -1001], no call
    assert bytes(buf) == blocks(0, 2)


def test_listio_redrives_requests_failed_by_a_reset_once_recovered(fd):
    t, dp, epoch, calls = _replica(fd)

    def recover():                               # a reset lands right after
        calls.append(int(epoch[0]))              # the first recovery
        t.watch_epoch(epoch, int(epoch[0]))
        if len(calls) == 1:
            epoch[0] += 1
        return True
    dp.on_reset = recover
    epoch[0] = 1
    data = bytearray(blocks(7, 3))
    st, cd = dp.listio([LIST_WRITE] * 3, [0, 1, 2], [1, 1, 1], data, [0, BS, 2 * BS])
    assert list(st) == [1, 1, 1] and list(cd) == [0, 0, 0]
    assert calls == [1, 2]
    assert dp.read(0, 3) == blocks(7, 3)
    assert dp.get_stats()["errors"] == 0 and dp.get_stats()["writes"] == 3


def test_listio_does_not_retry_a_failed_recovery(fd):
    t, dp, epoch, calls = _replica(fd)
    dp.on_reset = lambda: calls.append(1) and False
    epoch[0] = 1
    st, _ = dp.listio([LIST_READ], [0], [1], bytearray(BS), [0])
    assert list(st) == [-1001] and calls == [1]
    with pytest.raises(AdapterResetError):
        dp.readinto(0, bytearray(BS))


# -- item 12: a backing store that shrank ----------------------------------------------

def test_a_truncated_backing_store_says_where_it_ended(fd):
    os.pwrite(fd, blocks(0, 16), 0)
    t, dp = direct(fd, 15)
    os.ftruncate(fd, 8 * BS)
    with pytest.raises(OSError) as e:
        dp.read(12, 1)
    assert e.value.errno == errno.EIO
    msg = str(e.value)
    assert f"ended at byte {8 * BS}" in msg and "DK_CXLFLASH_VERIFY" in msg
    with pytest.raises(OSError) as e:
        dp.readinto(6, bytearray(4 * BS))
    assert e.value.errno == errno.EIO and f"byte {8 * BS}" in str(e.value)
    with pytest.raises(OSError) as e:
        afu_command(t, 0, fd, BS, 10, bytearray(BS))
    assert e.value.errno == errno.EIO and "DK_CXLFLASH_VERIFY" in str(e.value)
    st, _ = dp.listio([LIST_READ], [9], [1], bytearray(BS), [0])
    assert st[0] == -errno.EIO
    with pytest.raises(OSError) as e:
        raw_io(fd, [1], [9 * BS], BS, bytearray(BS))
    assert e.value.errno == errno.EIO and f"byte {8 * BS}" in str(e.value)


# -- item 13: integer arguments --------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, U64, -U64])
def test_out_of_range_integers_are_einval_naming_the_parameter(fd, bad):
    t, dp = virtual(fd, [0])
    calls = {"lba": [lambda: dp.readinto(bad, bytearray(BS)),
                     lambda: dp.write(bad, bytes(BS)), lambda: dp.read(bad, 1),
                     lambda: dp.unmap(bad, 1),
                     lambda: afu_command(t, 0, fd, BS, bad, bytearray(BS))],
             "nblocks": [lambda: dp.read(0, bad), lambda: dp.unmap(0, bad)],
             "handle": [lambda: afu_command(t, bad, fd, BS, 0, bytearray(BS))],
             "first_lba": [lambda: pattern.verify(bytes(BS), bad, [1], BS)],
             "limit": [lambda: setattr(dp, "limit", bad)],
             "max_xfer": [lambda: setattr(dp, "max_xfer", bad)]}
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(OSError) as e:
                fn()
            assert not isinstance(e.value, AfuError) and e.value.errno == errno.EINVAL
            assert e.value.strerror.startswith(f"{name} {bad} is out of range")
    assert dp.get_stats()["errors"] == 0


@pytest.mark.parametrize("bad", [0.5, 1.0, "1", None, b"\0"])
def test_non_integers_are_type_errors_naming_the_parameter(fd, bad):
    t, dp = virtual(fd, [0])
    dp.write(0, blocks(0, 1))
    for name, fn in (("lba", lambda: dp.write(bad, blocks(5, 1))),
                     ("lba", lambda: dp.readinto(bad, bytearray(BS))),
                     ("nblocks", lambda: dp.read(0, bad)),
                     ("lba", lambda: dp.unmap(bad, 1)),
                     ("block_size", lambda: afu_command(t, 0, fd, bad, 0, bytearray(BS)))):
        with pytest.raises(TypeError) as e:
            fn()
        assert str(e.value).startswith(f"{name} must be an integer")
    assert dp.read(0, 1) == blocks(0, 1)           # 0.5 did not write LBA 0


def test_integer_like_arguments_are_accepted(fd):
    _, dp = virtual(fd, [0])
    assert dp.write(np.uint64(3), blocks(3, 1)) == 1
    assert dp.read(np.int32(3), np.int8(1)) == blocks(3, 1)
    assert dp.unmap(np.uint16(3), True) == 1
    assert dp.read(3, 1) == bytes(BS)
    dp.limit = np.uint64(10)
    assert dp.limit == 10


@pytest.mark.parametrize("arrays, exc", [
    (dict(lbas=[-1]), OSError), (dict(lbas=[U64]), OSError),
    (dict(lbas=[-1, 2 ** 63]), OSError), (dict(nblocks=[0.5]), TypeError),
    (dict(offsets=[b""]), TypeError), (dict(lbas=np.array([1.0])), TypeError)])
def test_listio_arrays_are_checked(fd, arrays, exc):
    _, dp = virtual(fd, [0])
    args = dict(ops=[LIST_READ], lbas=[0], nblocks=[1], offsets=[0]) | arrays
    with pytest.raises(exc) as e:
        dp.listio(args["ops"], args["lbas"], args["nblocks"], bytearray(BS),
                  args["offsets"])
    if exc is OSError:
        assert e.value.errno == errno.EINVAL and "lbas" in str(e.value)
    else:
        name = next(iter(arrays))
        assert name in str(e.value)


def test_listio_unknown_ops_and_wrapping_ranges_fail_alone(fd):
    _, dp = direct(fd, 15)
    dp.write(0, blocks(0, 16))
    buf = bytearray(2 * BS)
    st, _ = dp.listio([LIST_READ, 257, LIST_UNMAP, LIST_READ], [0, 0, 4, 1],
                      np.array([1, 1, U64 - 3, 1], np.uint64), buf, [0, 0, 0, BS])
    assert list(st) == [1, -errno.EINVAL, -errno.EINVAL, 1]
    assert dp.read(0, 16) == blocks(0, 16)


def test_a_forked_childs_listio_recovers_after_its_owners_reset():
    """End to end: the owner resets the AFU; the child's replica learns of
    it through the reset epoch only (its table stays LIVE).  readinto
    recovered; listio returned -1001 on main."""
    import cxlflash
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * BS)
        ctx = a.open_disk(w).attach()
        v = ctx.create_virtual(16)
        v.write(0, blocks(0, 2))
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                       # pragma: no cover (child)
            res = []
            try:
                ctx.clone_after_fork()
                os.write(from_child_w, b"c")               # cloned: parent, reset now
                os.read(to_child_r, 1)
                buf = bytearray(2 * BS)
                r = v.listio([LIST_READ, LIST_READ], [0, 1], [1, 1], buf)
                res.append(r.ok)
                res.append(bytes(buf) == blocks(0, 2))
                res.append(ctx.resets == 1)
            except BaseException:
                res.append(False)
            os.write(from_child_w, bytes(int(x) for x in res))
            os._exit(0)
        assert os.read(from_child_r, 1) == b"c"
        a.reset()
        os.write(to_child_w, b"r")
        got = os.read(from_child_r, 16)
        os.waitpid(pid, 0)
        for f in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(f)
        assert list(got) == [1, 1, 1]
    finally:
        a.close()
