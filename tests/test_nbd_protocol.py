"""NBD protocol conformance, bad input and durability of the NBD export
(issue 11), spoken byte by byte with the strict client of ``nbd_wire``.

Most tests run against an in-process ``NbdServer`` on an embedded adapter
(fixture ``served``: exports "disk" then "other" on one memory LUN); a few
against ``cxlflash nbd`` as a process (``nbd_servers.NbdProcess``): the
fuzz's process twin, SIGKILL after an answered FLUSH, SIGTERM, and the
command line's errors."""
import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import cxlflash
from cxlflash.server.nbd import NbdServer

import nbd_wire as w
from nbd_wire import Closed, Conn, checked_ok
from nbd_servers import NbdProcess, subprocess_env

MiB = 1 << 20
KiB = 1 << 10
DISK = 64 * MiB                 # export "disk" (the first: the default export)
OTHER = 8 * MiB                 # export "other": its data must never change
LUN = 1 << 30                   # the memory LUN both are carved from
MAX_PAYLOAD = 32 * MiB

TRANSMISSION_FLAGS = (w.FLAG_HAS_FLAGS | w.FLAG_SEND_FLUSH | w.FLAG_SEND_FUA
                      | w.FLAG_SEND_TRIM | w.FLAG_SEND_WRITE_ZEROES | w.FLAG_SEND_CACHE
                      | w.FLAG_CAN_MULTI_CONN | w.FLAG_SEND_FAST_ZERO)


def short_dir():
    """A short directory for unix sockets (sun_path holds 108 bytes; pytest's
    tmp_path can be longer)."""
    return tempfile.mkdtemp(prefix="nbdp", dir="/tmp")


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


class Served:
    """An in-process server: ``.srv``, ``.adapter``, ``.path`` (unix),
    ``.tcp`` (host, port), ``.log`` (the server's log lines)."""

    def __init__(self):
        self.dir = short_dir()
        self.log = []
        self.adapter = cxlflash.Adapter()
        self.wwid = self.adapter.add_lun(None, size=LUN)
        self.srv = NbdServer(self.adapter, log=self.log.append)
        self.srv.add_export("disk", DISK)
        self.srv.add_export("other", OTHER)
        self.path = self.srv.listen_unix(os.path.join(self.dir, "s"))
        self.tcp = self.srv.listen_tcp("127.0.0.1", 0)
        self.srv.start()
        self._other = None

    def raw(self, address=None, timeout=10.0):
        return Conn.connect(self.path if address is None else address, timeout)

    def conn(self, name="disk", structured=True, meta=False, address=None):
        c = self.raw(address)
        c.handshake(name, structured=structured, meta=meta)
        return c

    def fill_other(self):
        """Known data at both ends of "other", and its digest."""
        with self.conn("other", structured=False) as c:
            checked_ok(c.write(0, pattern(1, MiB)))
            checked_ok(c.write(OTHER - MiB, pattern(2, MiB)))
            checked_ok(c.flush())
        self._other = self.other_digest()

    def other_digest(self):
        with self.conn("other", structured=False) as c:
            h = hashlib.sha256()
            for off in range(0, OTHER, 4 * MiB):
                h.update(checked_ok(c.read(off, 4 * MiB)).data)
            return h.hexdigest()

    def assert_other_intact(self):
        assert self._other is not None
        assert self.other_digest() == self._other, "export 'other' changed"

    def assert_serving(self, address=None):
        """A well-behaved client still gets its data back."""
        data = os.urandom(8 * KiB)
        with self.conn(address=address) as c:
            checked_ok(c.write(DISK - 8 * KiB, data))
            assert checked_ok(c.read(DISK - 8 * KiB, 8 * KiB)).data == data
            c.disc()
            c.expect_closed()

    def close(self):
        self.srv.close()
        self.adapter.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def served():
    s = Served()
    try:
        yield s
    finally:
        s.close()


def fresh_block_status(c, offset, length, flags=0):
    r = checked_ok(c.block_status(offset, length, flags))
    (cid,) = [k for k, v in c.meta_contexts.items() if v == "base:allocation"]
    return r.extents[cid]


def status_at(extents, offset, start):
    """The base:allocation flags of the extent holding ``offset``
    (extents starting at ``start``)."""
    pos = start
    for length, flags in extents:
        if pos <= offset < pos + length:
            return flags
        pos += length
    raise AssertionError(f"offset {offset} not described by {extents}")


# -- handshake ------------------------------------------------------------

def test_greeting_is_fixed_newstyle_with_no_zeroes(served):
    with served.raw() as c:
        assert c.read_greeting() == w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, w.FLAG_C_FIXED_NEWSTYLE | 1 << 5, 0xFFFFFFFF])
def test_client_flags_with_unknown_bits_close_the_connection(served, flags):
    with served.raw() as c:
        c.greet(flags)
        try:
            c.send_option(w.OPT_LIST)
        except Closed:
            pass
        c.expect_closed()
    served.assert_serving()


@pytest.mark.parametrize("client_flags", [w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES,
                                          w.FLAG_C_NO_ZEROES])
def test_export_name_with_no_zeroes_sends_no_padding(served, client_flags):
    with served.raw() as c:
        c.greet(client_flags)
        info = c.export_name("disk")
        assert info.size == served.srv.exports["disk"].size == DISK
        assert info.flags == TRANSMISSION_FLAGS
        # Any padding would be read here as the reply's magic.
        r = checked_ok(c.read(0, 512))
        assert r.kind == "simple" and r.data == bytes(512)


@pytest.mark.parametrize("client_flags", [w.FLAG_C_FIXED_NEWSTYLE, 0])
def test_export_name_without_no_zeroes_sends_124_zero_bytes(served, client_flags):
    with served.raw() as c:
        c.greet(client_flags)
        info = c.export_name("disk")            # reads and checks the 124 zeros
        assert info.size == DISK
        checked_ok(c.write(4096, b"z" * 100))
        assert checked_ok(c.read(4096, 100)).data == b"z" * 100


def test_export_name_of_an_unknown_export_closes(served):
    with served.raw() as c:
        c.greet()
        c.send_option(w.OPT_EXPORT_NAME, b"nosuch")
        c.expect_closed()
    served.assert_serving()


def test_empty_export_name_is_the_first_export(served):
    with served.raw() as c:
        c.greet()
        info = c.export_name("")
        assert info.size == DISK
    with served.raw() as c:
        c.greet()
        info = c.go("", [w.INFO_NAME])
        assert info.size == DISK and info.name == "disk"


# -- options --------------------------------------------------------------

def test_list_names_every_export_then_acks(served):
    with served.raw() as c:
        c.greet()
        replies = c.option_replies(w.OPT_LIST, intermediate=(w.REP_SERVER,))
        assert [r.type for r in replies] == [w.REP_SERVER, w.REP_SERVER, w.REP_ACK]
        assert sorted(c.list_exports()) == ["disk", "other"]


def test_list_with_data_is_invalid_and_the_connection_stays_usable(served):
    with served.raw() as c:
        c.greet()
        r = c.option_final(w.OPT_LIST, b"xyz")
        assert r.type == w.REP_ERR_INVALID
        assert sorted(c.list_exports()) == ["disk", "other"]


@pytest.mark.parametrize("opt", [w.OPT_INFO, w.OPT_GO])
def test_info_and_go_describe_the_export(served, opt):
    with served.raw() as c:
        c.greet()
        assert c.structured_reply().type == w.REP_ACK
        info, final = c.info_replies(opt, c.info_data("other", [w.INFO_BLOCK_SIZE, w.INFO_NAME]))
        assert final.type == w.REP_ACK, final
        assert info.size == OTHER == served.srv.exports["other"].size
        assert info.flags == TRANSMISSION_FLAGS | w.FLAG_SEND_DF
        assert info.block_size == (1, 4096, MAX_PAYLOAD)
        assert info.name in (None, "other")
        if opt == w.OPT_INFO:                        # still negotiating
            assert sorted(c.list_exports()) == ["disk", "other"]
            assert c.go("other").size == OTHER
        else:
            c._enter_transmission(info)
        assert checked_ok(c.read(OTHER - 4096, 4096)).data == bytes(4096)


@pytest.mark.parametrize("opt", [w.OPT_INFO, w.OPT_GO])
def test_info_and_go_of_an_unknown_export(served, opt):
    with served.raw() as c:
        c.greet()
        info, final = c.info_replies(opt, c.info_data("nosuch", [w.INFO_BLOCK_SIZE]))
        assert final.type == w.REP_ERR_UNKNOWN and info.size is None
        assert c.go("disk").size == DISK           # still negotiating
        checked_ok(c.read(0, 1))


def _info_malformed():
    good = Conn.info_data("disk", [w.INFO_BLOCK_SIZE])
    return {
        "name-longer-than-data": (Conn.info_data("disk", [], name_length=100), None),
        "name-length-2**32-1": (Conn.info_data("disk", [], name_length=0xFFFFFFFF), None),
        "count-past-the-end": (Conn.info_data("disk", [w.INFO_NAME], count=5), None),
        "count-short": (Conn.info_data("disk", [w.INFO_NAME, w.INFO_BLOCK_SIZE], count=1), None),
        "no-count": (struct.pack(">I", 4) + b"disk", None),
        "three-bytes": (b"\0\0\0", None),
        "empty": (b"", None),
        "odd-trailing-byte": (good + b"\0", None),
    }


@pytest.mark.parametrize("opt", [w.OPT_INFO, w.OPT_GO])
@pytest.mark.parametrize("case", sorted(_info_malformed()))
def test_info_and_go_with_malformed_lengths_are_invalid(served, opt, case):
    data, length = _info_malformed()[case]
    with served.raw() as c:
        c.greet()
        info, final = c.info_replies(opt, data, length)
        assert final.type == w.REP_ERR_INVALID, (case, final)
        assert info.size is None
        # Still negotiating, and the stream is in step.
        assert sorted(c.list_exports()) == ["disk", "other"]
        assert c.go("disk").size == DISK
        checked_ok(c.read(0, 1))


def test_abort_acks_then_closes(served):
    with served.raw() as c:
        c.greet()
        assert c.abort() is not None            # ACK, then EOF
    with served.raw() as c:                     # data with ABORT: ignored
        c.greet()
        c.send_option(w.OPT_ABORT, b"junk")
        r = c.read_option_reply(w.OPT_ABORT)
        assert r.type == w.REP_ACK
        c.expect_closed()
    served.assert_serving()


def test_structured_reply_option(served):
    with served.raw() as c:
        c.greet()
        assert c.option_final(w.OPT_STRUCTURED_REPLY, b"x").type == w.REP_ERR_INVALID
        assert c.structured_reply().type == w.REP_ACK
        info = c.go("disk")
        assert info.flags & w.FLAG_SEND_DF
        r = checked_ok(c.read(0, 4096))
        assert r.kind == "structured"


def test_list_meta_context(served):
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        assert set(c.list_meta_context("disk", ["base:allocation"])) == {"base:allocation"}
        assert "base:allocation" in c.list_meta_context("disk", [])
        assert "base:allocation" in c.list_meta_context("disk", ["base:"])
        assert c.list_meta_context("disk", ["x-nosuch:thing", "base:nosuch"]) == {}
        # LIST selects nothing: BLOCK_STATUS stays refused.
        c.go("disk")
        r = c.block_status(0, 4096)
        assert r.error == w.EINVAL


def test_list_meta_context_ids_are_zero(served):
    """The spec: in LIST_META_CONTEXT replies "the metadata context ID ...
    is reserved and SHOULD be set to zero" (only SET hands out ids)."""
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        assert c.list_meta_context("disk", ["base:allocation"]) == {"base:allocation": 0}
        assert c.list_meta_context("disk", []) == {"base:allocation": 0}
        assert list(c.set_meta_context("disk", ["base:allocation"])) == ["base:allocation"]


def test_set_meta_context_selects_base_allocation_only(served):
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        found = c.set_meta_context("disk", ["x-nosuch:thing", "base:allocation", "base:nosuch"])
        assert list(found) == ["base:allocation"]
        c.go("disk")
        ext = fresh_block_status(c, 0, MiB)
        assert ext[0][1] == w.STATE_HOLE | w.STATE_ZERO, ext      # never written


def test_set_meta_context_before_structured_reply_is_invalid(served):
    with served.raw() as c:
        c.greet()
        found, final = c.meta_replies(w.OPT_SET_META_CONTEXT,
                                      c.meta_data("disk", ["base:allocation"]))
        assert final.type == w.REP_ERR_INVALID and found == {}
        c.structured_reply()
        assert list(c.set_meta_context("disk", ["base:allocation"])) == ["base:allocation"]
        c.go("disk")
        fresh_block_status(c, 0, 4096)


@pytest.mark.parametrize("opt", [w.OPT_SET_META_CONTEXT, w.OPT_LIST_META_CONTEXT])
def test_meta_context_with_malformed_lengths_is_invalid(served, opt):
    cases = [
        Conn.meta_data("disk", ["base:allocation"], name_length=1000),
        Conn.meta_data("disk", ["base:allocation"], count=3),
        Conn.meta_data("disk", []) + b"\0",
        struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 100) + b"base:",
        b"\0\0",
    ]
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        for data in cases:
            found, final = c.meta_replies(opt, data)
            assert final.type == w.REP_ERR_INVALID, (data, final)
        assert sorted(c.list_exports()) == ["disk", "other"]


@pytest.mark.parametrize("opt", [w.OPT_PEEK_EXPORT, w.OPT_STARTTLS, w.OPT_EXTENDED_HEADERS,
                                 12, 1000, 0x7FFFFFFF, 0xFFFFFFFF, 0])
def test_unsupported_options_are_err_unsup(served, opt):
    with served.raw() as c:
        c.greet()
        assert c.option_final(opt).type == w.REP_ERR_UNSUP
        # With data (skipped); STARTTLS may call data invalid instead.
        allowed = {w.REP_ERR_UNSUP}
        if opt in (w.OPT_STARTTLS, w.OPT_EXTENDED_HEADERS):
            allowed.add(w.REP_ERR_INVALID)
        assert c.option_final(opt, os.urandom(3000)).type in allowed
        assert sorted(c.list_exports()) == ["disk", "other"]
        c.go("disk")
        checked_ok(c.read(0, 1))


def test_option_length_of_1_gib_closes_and_others_are_served(served):
    with served.raw() as keep:                  # a client in transmission meanwhile
        keep.handshake("disk")
        for opt in (w.OPT_LIST, w.OPT_GO, 1000):
            with served.raw() as c:
                c.greet()
                c.send_option(opt, b"\0" * 100, length=1 << 30)
                t0 = time.monotonic()
                c.read_until_closed(timeout=10)
                assert time.monotonic() - t0 < 5
        checked_ok(keep.write(0, b"still"))
        assert checked_ok(keep.read(0, 5)).data == b"still"
    served.assert_serving()


def test_bad_option_magic_closes(served):
    with served.raw() as c:
        c.greet()
        c.send_option(w.OPT_LIST, magic=0x1122334455667788)
        c.read_until_closed()
    served.assert_serving()


# -- transmission -----------------------------------------------------------

def test_transmission_flags(served):
    with served.conn(structured=False) as c:
        assert c.export.flags == TRANSMISSION_FLAGS
    with served.conn(structured=True) as c:
        assert c.export.flags == TRANSMISSION_FLAGS | w.FLAG_SEND_DF


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_read_write_round_trip(served, structured, transport):
    addr = served.tcp if transport == "tcp" else None
    with served.conn(structured=structured, address=addr) as c:
        cases = [(0, 4096), (4097, 10000), (DISK - 513, 513), (5 * MiB + 3, 3 * MiB + 5),
                 (7, 1)]
        for i, (off, n) in enumerate(cases):
            data = pattern(100 + i, n)
            checked_ok(c.write(off, data, w.CMD_FLAG_FUA if i % 2 else 0))
            r = checked_ok(c.read(off, n))
            assert r.data == data
            assert r.kind == ("structured" if structured else "simple")
        # Neighbours of the unaligned writes are intact.
        assert checked_ok(c.read(4096, 1)).data == b"\0"
        want = bytearray(pattern(100, 4096))
        want[7:8] = pattern(104, 1)
        assert checked_ok(c.read(0, 4096)).data == bytes(want)


def test_read_of_the_whole_maximum_payload(served):
    data = pattern(7, MAX_PAYLOAD)
    with served.conn(structured=False) as c:
        checked_ok(c.write(0, data))
        assert checked_ok(c.read(0, MAX_PAYLOAD)).data == data
    with served.conn(structured=True) as c:
        assert checked_ok(c.read(0, MAX_PAYLOAD)).data == data
        # Unaligned, the maximum still goes through (a block more of buffer).
        checked_ok(c.write(4095, data))
        assert checked_ok(c.read(4095, MAX_PAYLOAD)).data == data
        assert checked_ok(c.read(0, 4095)).data == data[:4095]


def test_read_with_df_is_one_data_chunk(served):
    with served.conn() as c:
        checked_ok(c.write(MiB, pattern(3, 4096)))
        checked_ok(c.trim(MiB + 4096, 60 * KiB))
        r = checked_ok(c.read(MiB, 64 * KiB, w.CMD_FLAG_DF))
        content = [t for _, t, _ in r.chunks if t in (w.REPLY_TYPE_OFFSET_DATA,
                                                      w.REPLY_TYPE_OFFSET_HOLE)]
        assert content == [w.REPLY_TYPE_OFFSET_DATA]
        assert r.data == pattern(3, 4096) + bytes(60 * KiB)


def test_read_over_a_trimmed_range_has_hole_chunks(served):
    with served.conn() as c:
        base = 8 * MiB
        checked_ok(c.write(base, pattern(4, 2 * MiB)))
        checked_ok(c.trim(base + 512 * KiB, MiB))
        r = checked_ok(c.read(base, 2 * MiB))
        assert r.data == pattern(4, 512 * KiB) + bytes(MiB) + pattern(4, 2 * MiB)[1536 * KiB:]
        assert r.holes, r
        assert sum(s for _, s in r.holes) >= 512 * KiB
        for o, s in r.holes:
            assert base + 512 * KiB <= o and o + s <= base + 1536 * KiB, r.holes
        # A fresh, never-written range of 64 KiB reads as a hole too.
        r = checked_ok(c.read(40 * MiB, 64 * KiB))
        assert r.holes == [(40 * MiB, 64 * KiB)] and r.data == bytes(64 * KiB)


def test_unaligned_zeroing_and_trim_keep_their_neighbours(served):
    """200 random unaligned WRITE_ZEROES (with and without NO_HOLE) and
    TRIMs: the range reads as zeros (WRITE_ZEROES), every byte outside it
    is unchanged (both: a punched hole is rounded inwards)."""
    rng = random.Random(23)
    with served.conn() as c:
        for k in range(200):
            off, n = rng.randrange(0, 64 * KiB), rng.randrange(1, 40000)
            cmd = rng.choice([w.CMD_WRITE_ZEROES, w.CMD_TRIM])
            flags = rng.choice([0, w.CMD_FLAG_NO_HOLE]) if cmd == w.CMD_WRITE_ZEROES else 0
            base = pattern(k, 128 * KiB)
            checked_ok(c.write(0, base))
            checked_ok(c.command(cmd, off, n, flags))
            got = checked_ok(c.read(0, 128 * KiB)).data
            assert got[:off] == base[:off] and got[off + n:] == base[off + n:], (cmd, off, n)
            if cmd == w.CMD_WRITE_ZEROES:
                assert got[off:off + n] == bytes(n), (flags, off, n)


def test_requests_split_into_tiny_pieces(served):
    """Headers and payloads arriving 7 bytes at a time."""
    with served.conn() as c:
        data = pattern(24, 4096)
        msg = bytearray()
        for i, off in enumerate((12345, 50000)):
            msg += struct.pack(">IHHQQI", w.REQUEST_MAGIC, 0, w.CMD_WRITE, 70 + i, off, 4096) + data
            c.pending[70 + i] = w.Reply(70 + i, (w.CMD_WRITE, 0, off, 4096))
        msg += struct.pack(">IHHQQI", w.REQUEST_MAGIC, 0, w.CMD_READ, 72, 12345, 4096)
        c.pending[72] = w.Reply(72, (w.CMD_READ, 0, 12345, 4096))
        for i in range(0, len(msg), 7):
            c.send(msg[i:i + 7])
            if i % 700 == 0:
                time.sleep(0.001)
        replies = {r.cookie: checked_ok(r) for r in c.read_replies(3)}
        assert sorted(replies) == [70, 71, 72]
        assert checked_ok(c.read(50000, 4096)).data == data
        assert checked_ok(c.read(12345, 4096)).data == data


def test_an_export_of_an_odd_size(served):
    served.srv.add_export("odd", MiB + 1)
    with served.conn("odd", meta=True) as c:
        assert c.export.size == MiB + 1
        checked_ok(c.write(MiB, b"Z"))
        assert checked_ok(c.read(MiB, 1)).data == b"Z"
        assert c.read(MiB, 2).error == w.EINVAL
        assert c.write(MiB + 1, b"Y").error == w.ENOSPC
        assert fresh_block_status(c, MiB - 4096, 4097) == [(4096, w.STATE_HOLE | w.STATE_ZERO),
                                                         (1, 0)]
        r = checked_ok(c.read(0, MiB + 1))
        assert r.data == bytes(MiB) + b"Z"
        checked_ok(c.write_zeroes(MiB, 1))
        assert checked_ok(c.read(MiB - 1, 2)).data == b"\0\0"


def test_block_status(served):
    with served.conn(meta=True) as c:
        ext = fresh_block_status(c, 0, DISK)
        assert ext[0][1] == w.STATE_HOLE | w.STATE_ZERO     # never written
        checked_ok(c.write(0, pattern(5, 64 * KiB)))
        ext = fresh_block_status(c, 0, MiB)
        assert ext[0] == (64 * KiB, 0), ext
        assert ext[1][1] == w.STATE_HOLE | w.STATE_ZERO, ext
        one = fresh_block_status(c, 0, MiB, w.CMD_FLAG_REQ_ONE)
        assert one == [(64 * KiB, 0)]
        one = fresh_block_status(c, 64 * KiB, 4096, w.CMD_FLAG_REQ_ONE)
        assert one == [(4096, w.STATE_HOLE | w.STATE_ZERO)]
        one = fresh_block_status(c, 0, 4096, w.CMD_FLAG_REQ_ONE)
        assert one == [(4096, 0)]
        # Past the end.
        assert c.block_status(DISK - 4096, 8192).error == w.EINVAL
        assert c.block_status(DISK, 1).error == w.EINVAL


def test_block_status_without_a_context_is_einval(served):
    with served.conn(structured=True, meta=False) as c:
        assert c.block_status(0, 4096).error == w.EINVAL
        checked_ok(c.read(0, 1))
    with served.conn(structured=False) as c:
        r = c.block_status(0, 4096)
        assert r.kind == "simple" and r.error == w.EINVAL
        checked_ok(c.read(0, 1))


def test_trim_reads_zeros_and_is_a_hole(served):
    with served.conn(meta=True) as c:
        off = 16 * MiB
        checked_ok(c.write(off, pattern(6, MiB)))
        assert status_at(fresh_block_status(c, off, MiB), off, off) == 0
        checked_ok(c.trim(off, MiB))
        assert checked_ok(c.read(off, MiB)).data == bytes(MiB)
        assert fresh_block_status(c, off, MiB, w.CMD_FLAG_REQ_ONE) == \
            [(MiB, w.STATE_HOLE | w.STATE_ZERO)]
        assert status_at(fresh_block_status(c, off, MiB), off, off) == w.STATE_HOLE | w.STATE_ZERO
        assert c.trim(DISK - 4096, 8192).error == w.EINVAL


def test_write_zeroes_with_and_without_no_hole(served):
    with served.conn(meta=True) as c:
        a, b = 20 * MiB, 24 * MiB
        checked_ok(c.write(a, pattern(8, MiB)))
        checked_ok(c.write(b, pattern(9, MiB)))
        checked_ok(c.write_zeroes(a, MiB))
        checked_ok(c.write_zeroes(b, MiB, w.CMD_FLAG_NO_HOLE))
        assert checked_ok(c.read(a, MiB)).data == bytes(MiB)
        assert checked_ok(c.read(b, MiB)).data == bytes(MiB)
        assert fresh_block_status(c, a, MiB, w.CMD_FLAG_REQ_ONE) == \
            [(MiB, w.STATE_HOLE | w.STATE_ZERO)]
        assert status_at(fresh_block_status(c, b, MiB), b, b) & w.STATE_HOLE == 0
        # Unaligned zeroing keeps the neighbours.
        checked_ok(c.write(a, pattern(10, 8192)))
        checked_ok(c.write_zeroes(a + 100, 1000))
        want = bytearray(pattern(10, 8192))
        want[100:1100] = bytes(1000)
        assert checked_ok(c.read(a, 8192)).data == bytes(want)


def test_fast_zero(served):
    with served.conn(meta=True) as c:
        a = 28 * MiB
        checked_ok(c.write(a, pattern(11, MiB)))
        r = c.write_zeroes(a, MiB, w.CMD_FLAG_FAST_ZERO | w.CMD_FLAG_NO_HOLE)
        assert r.error == w.ENOTSUP
        assert checked_ok(c.read(a, MiB)).data == pattern(11, MiB)     # untouched
        checked_ok(c.write_zeroes(a, MiB, w.CMD_FLAG_FAST_ZERO))       # memfd punches
        assert checked_ok(c.read(a, MiB)).data == bytes(MiB)
        assert fresh_block_status(c, a, MiB, w.CMD_FLAG_REQ_ONE)[0][1] == \
            w.STATE_HOLE | w.STATE_ZERO


def test_cache_and_flush(served):
    with served.conn() as c:
        checked_ok(c.write(30 * MiB, pattern(12, 8192)))
        checked_ok(c.cache(30 * MiB, 8192))
        checked_ok(c.cache(0, DISK))
        assert c.cache(DISK - 4096, 8192).error == w.EINVAL
        checked_ok(c.flush())
        checked_ok(c.write(30 * MiB, pattern(13, 100), w.CMD_FLAG_FUA))
        assert checked_ok(c.read(30 * MiB, 8192)).data == \
            pattern(13, 100) + pattern(12, 8192)[100:]


@pytest.mark.parametrize("structured", [False, True])
def test_disc_closes_after_the_replies_in_flight(served, structured):
    with served.conn(structured=structured) as c:
        checked_ok(c.write(0, pattern(14, MiB)))
        cookies = [c.send_request(w.CMD_READ, i * 64 * KiB, 64 * KiB) for i in range(16)]
        cookies.append(c.send_request(w.CMD_WRITE, 2 * MiB, 4096, payload=b"w" * 4096))
        c.disc()
        replies = c.read_replies(len(cookies))
        assert sorted(r.cookie for r in replies) == sorted(cookies)
        for r in replies:
            checked_ok(r)
            if r.request[0] == w.CMD_READ:
                off = r.request[2]
                assert r.data == pattern(14, MiB)[off:off + 64 * KiB]
        c.expect_closed()
    with served.conn() as c:
        assert checked_ok(c.read(2 * MiB, 4096)).data == b"w" * 4096


def _pipeline(c, rng, count, read_max, write_max):
    """``count`` requests (reads of the 4 MiB at 0, writes from 8 MiB on)
    with random 64-bit cookies: {cookie: ("r", off, n) | ("w", off, data)}."""
    sent = {}
    for i in range(count):
        cookie = rng.getrandbits(64)
        if i % 2:
            off, n = rng.randrange(0, 4 * MiB - read_max), rng.randrange(1, read_max)
            c.send_request(w.CMD_READ, off, n, cookie=cookie)
            sent[cookie] = ("r", off, n)
        else:
            off = 8 * MiB + i * write_max
            data = pattern(1000 + i, write_max - i % 4096)
            c.send_request(w.CMD_WRITE, off, len(data), cookie=cookie, payload=data)
            sent[cookie] = ("w", off, data)
    return sent


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_requests_each_answered_once(served, structured):
    """32 requests sent before any reply is read (replies small enough for
    the socket buffers: a client that never reads can block any server)."""
    rng = random.Random(15)
    with served.conn(structured=structured) as c:
        base = pattern(16, 4 * MiB)
        checked_ok(c.write(0, base))
        sent = _pipeline(c, rng, 32, 4096, 64 * KiB)
        replies = c.read_replies(32)
        assert not c.pending
        assert sorted(r.cookie for r in replies) == sorted(sent)
        for r in replies:
            checked_ok(r)
            kind, off, x = sent[r.cookie]
            if kind == "r":
                assert r.data == base[off:off + x]
        for kind, off, x in sent.values():
            if kind == "w":
                assert checked_ok(c.read(off, len(x))).data == x


@pytest.mark.parametrize("structured", [False, True])
def test_many_requests_in_flight_while_replies_are_read(served, structured):
    """512 requests with large reads, sent from a thread while this one
    reads the replies: every cookie answered once, with its data."""
    rng = random.Random(17)
    with served.conn(structured=structured) as c:
        base = pattern(18, 4 * MiB)
        checked_ok(c.write(0, base))
        box = {}

        def sender():
            box["sent"] = _pipeline(c, rng, 512, 256 * KiB, 32 * KiB)

        t = threading.Thread(target=sender)
        t.start()
        got = {}
        for _ in range(512):
            r = checked_ok(c.read_reply())
            assert r.cookie not in got
            got[r.cookie] = r
        t.join()
        sent = box["sent"]
        assert sorted(got) == sorted(sent)
        for cookie, (kind, off, x) in sent.items():
            if kind == "r":
                assert got[cookie].data == base[off:off + x]
        for kind, off, x in sent.values():
            if kind == "w":
                assert checked_ok(c.read(off, len(x))).data == x


@pytest.mark.parametrize("structured", [False, True])
def test_range_errors(served, structured):
    with served.conn(structured=structured) as c:
        for off, n in [(DISK - 4096, 8192), (DISK, 1), (DISK + MiB, 4096),
                       (2**64 - 4096, 8192), (2**64 - 1, 1), (2**63, 4096)]:
            assert c.read(off, n).error == w.EINVAL, (off, n)
            assert c.trim(off, n).error == w.EINVAL, (off, n)
            # Writes past the end: ENOSPC, as the spec says they SHOULD be.
            assert c.write_zeroes(off, n).error == w.ENOSPC, (off, n)
            r = c.write(off, pattern(off & 0xFFFF, n))   # the payload is consumed
            assert r.error == w.ENOSPC, (off, n)
        checked_ok(c.write(DISK - 4096, b"e" * 4096))
        assert checked_ok(c.read(DISK - 4096, 4096)).data == b"e" * 4096
    served.assert_serving()


@pytest.mark.parametrize("structured", [False, True])
def test_read_over_32_mib_is_einval(served, structured):
    with served.conn(structured=structured) as c:
        assert c.read(0, MAX_PAYLOAD + 1).error == w.EINVAL
        assert c.read(0, 0xFFFFFFFF).error == w.EINVAL
        checked_ok(c.read(0, 4096))


def test_write_over_32_mib_closes(served):
    with served.conn() as c:
        c.send_request(w.CMD_WRITE, 0, MAX_PAYLOAD + 1, payload=bytes(64 * KiB))
        try:
            c.send(bytes(MiB))
        except Closed:
            pass
        rest = c.read_until_closed()
        # An error reply before closing is allowed; nothing else.
        assert len(rest) <= 16 + 6 + 4096 + 20, rest[:64]
    served.assert_serving()


@pytest.mark.parametrize("cmd", [9, 99, 0x7FFF, 0xFFFF, w.CMD_RESIZE])
def test_unknown_command_is_einval(served, cmd):
    for structured in (False, True):
        with served.conn(structured=structured) as c:
            assert c.command(cmd, 0, 4096).error == w.EINVAL
            checked_ok(c.read(0, 1))


_FLAGS_ALLOWED = {
    w.CMD_READ: w.CMD_FLAG_FUA | w.CMD_FLAG_DF,
    w.CMD_WRITE: w.CMD_FLAG_FUA,
    w.CMD_FLUSH: w.CMD_FLAG_FUA,
    w.CMD_TRIM: w.CMD_FLAG_FUA,
    w.CMD_CACHE: w.CMD_FLAG_FUA,
    w.CMD_WRITE_ZEROES: w.CMD_FLAG_FUA | w.CMD_FLAG_NO_HOLE | w.CMD_FLAG_FAST_ZERO,
    w.CMD_BLOCK_STATUS: w.CMD_FLAG_FUA | w.CMD_FLAG_REQ_ONE,
}


@pytest.mark.parametrize("cmd", sorted(_FLAGS_ALLOWED))
def test_command_flags_not_documented_for_the_command_are_einval(served, cmd):
    """The spec: the server SHOULD return EINVAL for an unknown command flag
    and for a flag not documented as applicable to the request (as nbdkit
    and qemu-nbd do); a refused WRITE writes nothing."""
    with served.conn(meta=True) as c:
        checked_ok(c.write(0, b"before" * 1000))
        for bit in range(16):
            flag = 1 << bit
            if flag & _FLAGS_ALLOWED[cmd]:
                continue
            payload = b"after!" * 1000 if cmd == w.CMD_WRITE else None
            off, n = (0, 6000) if cmd != w.CMD_FLUSH else (0, 0)
            r = c.command(cmd, off, n, flag, payload=payload)
            assert r.error == w.EINVAL, (cmd, hex(flag), r)
        assert checked_ok(c.read(0, 6000)).data == b"before" * 1000


def test_df_without_structured_replies_is_einval(served):
    with served.conn(structured=False) as c:
        assert c.read(0, 4096, w.CMD_FLAG_DF).error == w.EINVAL
        checked_ok(c.read(0, 4096))


def test_df_read_larger_than_64_kib(served):
    with served.conn() as c:
        checked_ok(c.write(MiB, pattern(19, 4096)))
        r = c.read(MiB, 4 * MiB, w.CMD_FLAG_DF)        # one chunk, or EOVERFLOW
        if r.error:
            assert r.error == w.EOVERFLOW and not r.data_chunks and not r.holes, r
        else:
            assert len(r.data_chunks) == 1 and not r.holes
            assert r.data == pattern(19, 4096) + bytes(4 * MiB - 4096)


@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_requests_do_not_disconnect(served, structured):
    with served.conn(structured=structured, meta=structured) as c:
        for cmd in (w.CMD_READ, w.CMD_WRITE, w.CMD_TRIM, w.CMD_WRITE_ZEROES, w.CMD_CACHE,
                    w.CMD_BLOCK_STATUS):
            r = c.command(cmd, 4096, 0, payload=b"" if cmd == w.CMD_WRITE else None)
            assert r.error in (0, w.EINVAL), (cmd, r)
        checked_ok(c.write(4096, b"ok"))
        assert checked_ok(c.read(4096, 2)).data == b"ok"


def test_trim_and_zero_of_the_whole_export_in_one_request(served):
    """Effect lengths over the maximum payload: no disconnect (the spec:
    SHOULD NOT), and the whole range reads back as zeros."""
    with served.conn(meta=True) as c:
        checked_ok(c.write(0, pattern(20, MiB)))
        checked_ok(c.write(DISK - MiB, pattern(21, MiB)))
        checked_ok(c.write_zeroes(0, DISK, w.CMD_FLAG_NO_HOLE))
        assert checked_ok(c.read(DISK - MiB, MiB)).data == bytes(MiB)
        checked_ok(c.write(DISK - MiB, pattern(21, MiB)))
        checked_ok(c.trim(0, DISK))
        checked_ok(c.cache(0, DISK))
        assert checked_ok(c.read(DISK - MiB, MiB)).data == bytes(MiB)
        assert fresh_block_status(c, 0, DISK) == [(DISK, w.STATE_HOLE | w.STATE_ZERO)]


def allocation_map(c, offset, length):
    """The base:allocation flags of every 4 KiB block of the range, asked as
    a client does: again from the first offset a reply did not cover."""
    flags = []
    pos, end = offset, offset + length
    while pos < end:
        ext = fresh_block_status(c, pos, end - pos)
        for n, f in ext:
            n = min(n, end - pos)
            assert n % 4096 == 0, ext
            flags += [f] * (n // 4096)
            pos += n
            if pos >= end:
                break
    return flags


def test_block_status_of_a_fragmented_range_is_exact(served):
    """256 alternating data/hole blocks: the server may answer in several
    replies (fewer extents than the range needs), but what it describes
    is the truth: no hole reported as data (that makes nbdcopy and
    qemu-img copy zeros), no data as a hole."""
    with served.conn(meta=True) as c:
        base = 32 * MiB
        for i in range(0, 256, 2):
            checked_ok(c.write(base + i * 4096, pattern(i, 4096)))
        got = allocation_map(c, base, MiB)
        want = [0, w.STATE_HOLE | w.STATE_ZERO] * 128
        wrong = [i for i in range(256) if got[i] != want[i]]
        assert not wrong, (f"{len(wrong)} blocks misreported, from block {wrong[0]}: "
                           f"{fresh_block_status(c, base, MiB)[-3:]}")
        r = checked_ok(c.read(base, MiB))
        assert r.data == b"".join(pattern(i, 4096) if i % 2 == 0 else bytes(4096)
                                  for i in range(256))


def test_concurrent_unaligned_writes_into_the_same_blocks_lose_nothing(served):
    """Byte stripes of the same 4 KiB blocks written at once from 4
    connections, 64 requests each in flight: read-modify-write must not
    lose any of them."""
    base, stripes = 36 * MiB + 100, 256          # 256 stripes of 37 bytes
    conns = [served.conn() for _ in range(4)]
    try:
        def run(k):
            c = conns[k]
            for i in range(k, stripes, 4):
                c.send_request(w.CMD_WRITE, base + i * 37, 37, payload=pattern(i, 37))
            for r in c.read_replies(len(range(k, stripes, 4))):
                checked_ok(r)
        ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        got = checked_ok(conns[0].read(base, stripes * 37)).data
        want = b"".join(pattern(i, 37) for i in range(stripes))
        bad = [i for i in range(stripes) if got[i * 37:(i + 1) * 37] != want[i * 37:(i + 1) * 37]]
        assert not bad, f"stripes lost: {bad[:20]}"
    finally:
        for c in conns:
            c.close()


def test_concurrent_mixed_commands_match_a_model(served):
    """4 connections (2 structured, 2 simple), each owning every 4th
    1000-byte stripe of 2 MiB, so that every 4 KiB block is shared: random
    WRITE (some FUA), WRITE_ZEROES with and without NO_HOLE, READ and FLUSH,
    8 requests in flight per connection on distinct stripes.  Every READ and
    the final contents match a model of each connection's own stripes."""
    base, stripe, nstripes = 40 * MiB, 1000, 2 * MiB // 1000
    model = bytearray(nstripes * stripe)
    conns = [served.conn(structured=k % 2 == 0) for k in range(4)]
    errors = []

    def run(k):
        c = conns[k]
        rng = random.Random(100 + k)
        mine = list(range(k, nstripes, 4))
        try:
            for round_ in range(40):
                batch = rng.sample(mine, 8)
                expect = {}
                for i in batch:
                    op = rng.choice(["w", "w", "wfua", "z", "zn", "r"])
                    off = base + i * stripe
                    if op.startswith("w"):
                        data = rng.randbytes(stripe)
                        model[i * stripe:(i + 1) * stripe] = data
                        ck = c.send_request(w.CMD_WRITE, off, stripe,
                                            w.CMD_FLAG_FUA if op == "wfua" else 0, payload=data)
                    elif op in ("z", "zn"):
                        model[i * stripe:(i + 1) * stripe] = bytes(stripe)
                        ck = c.send_request(w.CMD_WRITE_ZEROES, off, stripe,
                                            w.CMD_FLAG_NO_HOLE if op == "zn" else 0)
                    else:
                        ck = c.send_request(w.CMD_READ, off, stripe)
                        expect[ck] = bytes(model[i * stripe:(i + 1) * stripe])
                if round_ % 10 == 9:
                    c.send_request(w.CMD_FLUSH)
                n = len(c.pending)
                for r in c.read_replies(n):
                    checked_ok(r)
                    if r.cookie in expect:
                        assert r.data == expect[r.cookie], f"connection {k}: stale read"
        except BaseException as e:
            errors.append(e)

    try:
        ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        got = checked_ok(conns[0].read(base, nstripes * stripe)).data
        bad = [i for i in range(nstripes)
               if got[i * stripe:(i + 1) * stripe] != model[i * stripe:(i + 1) * stripe]]
        assert not bad, f"{len(bad)} stripes differ from the model, first {bad[:10]}"
    finally:
        for c in conns:
            c.close()


def test_unaligned_write_racing_an_aligned_write_of_its_block(served):
    """Pairs in flight at once on two connections: U writes bytes [100, 200)
    of block x, A writes all of block x.  Either order is fine (A, or A with
    U's bytes), but never the old contents outside [100, 200): those bytes
    only A wrote.  (A read-modify-write for U that an aligned write can slip
    into writes A's bytes back with the old data.)  Up to 3 rounds of 8192
    pairs: the race is rare."""
    n = 8192
    old = pattern(1, n * 4096)
    with served.conn() as c0:
        for i in range(0, n * 4096, 16 * MiB):
            checked_ok(c0.write(i, old[i:i + 16 * MiB]))
        for round_ in range(3):
            a_data, u_data = pattern(2 + round_, n * 4096), pattern(10 + round_, n * 100)
            cu, ca = served.conn(), served.conn()
            window = threading.Semaphore(48)
            errors = []

            def sender():
                for x in range(n):
                    window.acquire()
                    window.acquire()
                    cu.send_request(w.CMD_WRITE, x * 4096 + 100, 100,
                                    payload=u_data[x * 100:(x + 1) * 100])
                    ca.send_request(w.CMD_WRITE, x * 4096, 4096,
                                    payload=a_data[x * 4096:(x + 1) * 4096])

            def reader(c):
                try:
                    for _ in range(n):
                        checked_ok(c.read_reply())
                        window.release()
                except BaseException as e:
                    errors.append(e)
                    for _ in range(n):
                        window.release()

            ts = [threading.Thread(target=sender), threading.Thread(target=reader, args=(cu,)),
                  threading.Thread(target=reader, args=(ca,))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            cu.close()
            ca.close()
            assert not errors, errors
            got = b"".join(checked_ok(c0.read(i, 16 * MiB)).data
                           for i in range(0, n * 4096, 16 * MiB))
            lost = []
            for x in range(n):
                g, a = got[x * 4096:(x + 1) * 4096], a_data[x * 4096:(x + 1) * 4096]
                if g[:100] != a[:100] or g[200:] != a[200:]:
                    lost.append(x)
                else:
                    assert g[100:200] in (a[100:200], u_data[x * 100:(x + 1) * 100]), x
            assert not lost, (f"round {round_}: {len(lost)} of {n} blocks lost the aligned "
                              f"write outside [100, 200) (blocks {lost[:8]})")


def test_set_meta_context_replaces_the_selection(served):
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        assert list(c.set_meta_context("disk", ["base:allocation"])) == ["base:allocation"]
        assert c.set_meta_context("disk", []) == {}          # zero queries: none
        assert c.set_meta_context("disk", ["base:"]) == {}   # "base:" is ignored by SET
        c.go("disk")
        assert c.block_status(0, 4096).error == w.EINVAL


@pytest.mark.parametrize("bad", ["malformed", "unknown-export"])
def test_a_failed_set_meta_context_also_replaces_the_selection(served, bad):
    """The spec: SET_META_CONTEXT "replaces all previously-set metadata
    contexts (including when this command fails)"."""
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        assert list(c.set_meta_context("disk", ["base:allocation"])) == ["base:allocation"]
        data = b"\0\0" if bad == "malformed" else c.meta_data("nosuch", ["base:allocation"])
        found, final = c.meta_replies(w.OPT_SET_META_CONTEXT, data)
        assert final.is_error and found == {}
        c.go("disk")
        assert c.block_status(0, 4096).error == w.EINVAL


@pytest.mark.parametrize("name", ["é" * 1000, "€" * 700, "x" + "é" * 1000, "😀" * 600],
                         ids=["e-acute", "euro", "x-e-acute", "emoji"])
def test_error_messages_stay_utf8_when_cut(served, name):
    """Error strings are UTF-8 (and <= 4096 bytes) even when the export name
    they quote is long and multi-byte (nbd_wire checks every message)."""
    with served.raw() as c:
        c.greet()
        c.structured_reply()
        for opt in (w.OPT_INFO, w.OPT_GO):
            info, final = c.info_replies(opt, c.info_data(name, []))
            assert final.type in (w.REP_ERR_UNKNOWN, w.REP_ERR_INVALID), final
        found, final = c.meta_replies(w.OPT_SET_META_CONTEXT, c.meta_data(name, ["base:allocation"]))
        assert final.is_error
        assert c.go("disk").size == DISK


@pytest.mark.parametrize("name", [b"x" * 5000, b"\xff\xfe", b"disk\0", b"disk/../other"])
def test_go_with_a_bad_export_name_is_an_error_reply(served, name):
    with served.raw() as c:
        c.greet()
        info, final = c.info_replies(w.OPT_GO, c.info_data(name, []))
        assert final.type in (w.REP_ERR_UNKNOWN, w.REP_ERR_INVALID), final
        assert info.size is None
        assert c.go("disk").size == DISK


def test_option_data_of_64_kib_is_read_and_one_byte_more_closes(served):
    with served.raw() as c:
        c.greet()
        assert c.option_final(77, bytes(64 * KiB)).type == w.REP_ERR_UNSUP
        assert c.option_final(w.OPT_GO, c.info_data("d" * 4000, []) + bytes(64 * KiB - 4008)
                              ).type in (w.REP_ERR_INVALID, w.REP_ERR_UNKNOWN)
        assert sorted(c.list_exports()) == ["disk", "other"]
    with served.raw() as c:
        c.greet()
        try:
            c.send_option(77, bytes(64 * KiB + 1))
        except Closed:
            pass
        c.read_until_closed()


def test_server_close_with_clients_connected(served):
    """srv.close() returns promptly with clients in the handshake and in
    transmission (one reading, one not); they all see the connection end,
    and nothing is accepted after."""
    reading = served.conn()
    stuck = served.conn(structured=False)
    negotiating = served.raw()
    negotiating.greet()
    for i in range(8):
        stuck.send_request(w.CMD_READ, 0, 4 * MiB)
    got = []

    def reader():
        try:
            while True:
                got.append(reading.read_reply())
        except Closed:
            got.append("closed")

    for i in range(64):
        reading.send_request(w.CMD_READ, i * 64 * KiB, 64 * KiB)
    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    served.srv.close()
    took = time.monotonic() - t0
    assert took < 5, f"srv.close() took {took:.1f} s"
    t.join(10)
    assert not t.is_alive() and got[-1] == "closed"
    assert all(r.error in (0, w.ESHUTDOWN) for r in got[:-1])
    stuck.read_until_closed()
    negotiating.read_until_closed()
    with pytest.raises(OSError):
        c = served.raw(timeout=2)
        c.greet()
        c.list_exports()
    for c in (reading, stuck, negotiating):
        c.close()


@pytest.mark.parametrize("magic", [0, w.SIMPLE_REPLY_MAGIC, w.EXTENDED_REQUEST_MAGIC,
                                   0x12560953, 0x25609514])
def test_bad_request_magic_closes(served, magic):
    with served.conn() as c:
        c.send_request(w.CMD_READ, 0, 4096, magic=magic)
        c.pending.clear()
        c.read_until_closed()
    served.assert_serving()


# -- bad input ----------------------------------------------------------------

_INTERESTING_OPTS = [w.OPT_EXPORT_NAME, w.OPT_ABORT, w.OPT_LIST, w.OPT_STARTTLS, w.OPT_INFO,
                     w.OPT_GO, w.OPT_STRUCTURED_REPLY, w.OPT_LIST_META_CONTEXT,
                     w.OPT_SET_META_CONTEXT, w.OPT_EXTENDED_HEADERS, 0, 77, 0xFFFFFFFF]


def _rand_len(rng, big):
    x = rng.random()
    if x < 0.6:
        return rng.randrange(0, 64)
    if x < 0.85:
        return rng.randrange(0, 9000)
    if x < 0.95:
        return rng.choice([0xFFFFFFFF, 1 << 31, big, big + 1, max(big - 1, 0), 65536, 65537])
    return rng.getrandbits(32)


def fuzz_one(rng, address, export="disk", size=DISK):
    """One connection fed garbage at a random stage; then the client
    half-closes and the server must close too."""
    stage = rng.choice([0, 1, 2, 3, 3, 4, 5, 6, 6, 6])
    c = Conn.connect(address, timeout=10)
    try:
        if stage == 0:                               # instead of the client flags
            c.send(rng.randbytes(rng.randrange(1, 300)))
        elif stage == 1:                             # flags, then garbage
            c.read_greeting()
            c.send(struct.pack(">I", rng.choice([0, 1, 3, 3, 3]))
                   + rng.randbytes(rng.randrange(0, 300)))
        elif stage in (2, 3):                        # option-shaped garbage
            c.greet()
            out = bytearray()
            for _ in range(rng.randrange(1, 6)):
                opt = rng.choice(_INTERESTING_OPTS)
                data = rng.randbytes(rng.randrange(0, 80))
                if stage == 3 and opt in (w.OPT_INFO, w.OPT_GO, w.OPT_SET_META_CONTEXT,
                                          w.OPT_LIST_META_CONTEXT):
                    # Plausible structure, wrong numbers.
                    name = rng.choice([export.encode(), b"", b"nosuch", rng.randbytes(5)])
                    data = (struct.pack(">I", _rand_len(rng, len(name))) + name
                            + struct.pack(">H", rng.randrange(0, 5)) + rng.randbytes(rng.randrange(0, 12)))
                length = len(data) if rng.random() < 0.8 else _rand_len(rng, len(data))
                magic = w.IHAVEOPT if rng.random() < 0.9 else rng.getrandbits(64)
                out += struct.pack(">QII", magic, opt, length) + data
            c.send(out)
        elif stage == 4:                             # random bytes as options
            c.greet()
            c.send(rng.randbytes(rng.randrange(1, 500)))
        else:                                        # transmission
            structured = rng.random() < 0.5
            c.handshake(export, structured=structured, meta=structured and rng.random() < 0.5)
            if stage == 5:
                c.send(rng.randbytes(rng.randrange(1, 500)))
            else:
                out = bytearray()
                for _ in range(rng.randrange(1, 10)):
                    cmd = rng.choice([0, 0, 1, 1, 3, 4, 5, 6, 7, 2, 8, rng.randrange(65536)])
                    flags = rng.choice([0, 0, 1, 2, 4, 8, 16, rng.randrange(65536)])
                    x = rng.random()
                    offset = (rng.randrange(0, size) if x < 0.7 else
                              rng.choice([size - 1, size, 2**64 - 1, 2**63, size - 4096]))
                    length = _rand_len(rng, MAX_PAYLOAD)
                    if cmd in (w.CMD_READ, w.CMD_WRITE) and length > 4 * MiB and rng.random() < 0.9:
                        length = rng.randrange(0, 4 * MiB)
                    magic = w.REQUEST_MAGIC if rng.random() < 0.95 else rng.getrandbits(32)
                    out += struct.pack(">IHHQQI", magic, flags, cmd, rng.getrandbits(64),
                                       offset, length)
                    if cmd == w.CMD_WRITE:
                        n = length if rng.random() < 0.8 else rng.randrange(0, 1000)
                        out += rng.randbytes(min(n, 4 * MiB))
                c.send(out)
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError as e:                         # TCP: already reset by the server
            assert e.errno == errno.ENOTCONN, e
            return stage
        c.read_until_closed(timeout=15)
    except Closed:
        pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        c.close()
    return stage


def test_fuzz_random_bytes_at_every_stage(served):
    served.fill_other()
    rng = random.Random(0x11)
    stages = set()
    for i in range(500):
        stages.add(fuzz_one(rng, served.tcp if i % 3 == 0 else served.path))
        if i % 50 == 49:
            served.assert_serving()
    assert stages == set(range(7))
    served.assert_serving()
    served.assert_serving(served.tcp)
    served.assert_other_intact()


def test_fuzz_against_the_process():
    d = short_dir()
    try:
        with NbdProcess(d, exports=["disk=64M", "other=8M"]) as p:
            with Conn.connect(p.socket) as c:
                c.handshake("other", structured=False)
                checked_ok(c.write(0, pattern(21, MiB)))
                checked_ok(c.write(7 * MiB, pattern(22, MiB)))
            rng = random.Random(0x12)
            for i in range(120):
                fuzz_one(rng, p.socket)
                assert p.proc.poll() is None, f"cxlflash nbd died:\n{p.log()}"
            with Conn.connect(p.socket) as c:
                c.handshake("other", structured=True)
                assert checked_ok(c.read(0, MiB)).data == pattern(21, MiB)
                assert checked_ok(c.read(7 * MiB, MiB)).data == pattern(22, MiB)
            with Conn.connect(p.socket) as c:
                c.handshake("disk")
                checked_ok(c.write(0, b"alive"))
                assert checked_ok(c.read(0, 5)).data == b"alive"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_fuzz_against_the_daemons_nbd_export():
    """``cxlflash serve --nbd``: the daemon's NBD listener fed the fuzz keeps
    serving NBD, "other" keeps its data, and the daemon's own clients
    (cxlflash.connect) are still served."""
    import daemon_process
    d = short_dir()
    try:
        nbd_sock = os.path.join(d, "n.sock")
        with daemon_process.start(d, "--size", "1G", "--nbd", f"unix:{nbd_sock}",
                                  "--export", "disk=64M", "--export", "other=8M") as dp:
            with Conn.connect(nbd_sock) as c:
                c.handshake("other", structured=False)
                checked_ok(c.write(0, pattern(28, MiB)))
            rng = random.Random(0x13)
            for i in range(120):
                fuzz_one(rng, nbd_sock)
                assert dp.proc.poll() is None, f"cxlflash serve died:\n{dp.log()}"
            with Conn.connect(nbd_sock) as c:
                c.handshake("other")
                assert checked_ok(c.read(0, MiB)).data == pattern(28, MiB)
            adapter = cxlflash.connect(dp.socket)
            try:
                assert adapter.luns()
            finally:
                adapter.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_disconnect_in_the_middle_of_a_write_payload(served):
    served.fill_other()
    for cut in (0, 1, 4096, 512 * KiB, MiB - 1):
        with served.conn() as c:
            c.send_request(w.CMD_WRITE, 4 * MiB, MiB, payload=pattern(cut, cut))
        with served.conn() as c:           # the header alone, on another
            c.send(struct.pack(">IHHQQI", w.REQUEST_MAGIC, 0, w.CMD_WRITE, 1, 0, 4096)[:cut % 28])
    served.assert_serving()
    served.assert_other_intact()


def test_requests_sent_and_the_reply_never_read(served):
    served.fill_other()
    for structured in (False, True):
        for _ in range(5):
            c = served.conn(structured=structured)
            for i in range(8):
                c.send_request(w.CMD_READ, i * 4 * MiB, 4 * MiB)
            c.send_request(w.CMD_WRITE, 48 * MiB, 4096, payload=b"q" * 4096)
            c.close()
    served.assert_serving()
    served.assert_other_intact()


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_many_connections_opened_and_dropped(served):
    served.assert_serving()
    time.sleep(0.2)
    fds0, threads0 = _fd_count(), threading.active_count()
    held = []
    for i in range(60):                          # many at once
        c = served.raw()
        if i % 3 == 1:
            c.read_greeting()
        elif i % 3 == 2:
            c.handshake("disk" if i % 2 else "other")
        held.append(c)
    served.assert_serving()
    for c in held:
        c.close()
    for i in range(150):                         # one after another
        c = served.raw()
        if i % 4 == 1:
            c.greet()
        elif i % 4 == 2:
            c.handshake()
            c.send_request(w.CMD_READ, 0, MiB)
        elif i % 4 == 3:
            c.greet()
            c.send_option(w.OPT_GO, b"\0\0")     # half an option
        c.close()
    served.assert_serving()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _fd_count() <= fds0 + 2 and threading.active_count() <= threads0 + 2:
            break
        time.sleep(0.1)
    assert _fd_count() <= fds0 + 2, (fds0, _fd_count(), "file descriptors leak")
    assert threading.active_count() <= threads0 + 2, (threads0, threading.active_count(),
                                                      "threads leak")


# -- durability -------------------------------------------------------------

@pytest.fixture
def file_served(tmp_path):
    path = str(tmp_path / "lun.img")
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
    d = short_dir()
    a = cxlflash.Adapter()
    wwid = a.add_lun(path)
    srv = NbdServer(a, log=None)
    srv.add_export("whole", None, direct=True, lun=wwid)
    sock = srv.listen_unix(os.path.join(d, "s"))
    srv.start()
    try:
        yield srv, sock, path
    finally:
        srv.close()
        a.close()
        shutil.rmtree(d, ignore_errors=True)


def _pread(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_flush_makes_answered_writes_reach_the_file(file_served):
    srv, sock, path = file_served
    with Conn.connect(sock) as c:
        info = c.handshake("whole")
        assert info.size == 256 * MiB == srv.exports["whole"].size
        for i, off in enumerate([0, 4096 * 7, 100 * MiB + 3, 256 * MiB - 8192]):
            checked_ok(c.write(off, pattern(30 + i, 8192)))
        checked_ok(c.flush())
        for i, off in enumerate([0, 4096 * 7, 100 * MiB + 3, 256 * MiB - 8192]):
            assert _pread(path, off, 8192) == pattern(30 + i, 8192), off


def test_file_holes_are_holes_and_trim_punches_them(file_served):
    srv, sock, path = file_served
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, pattern(60, 64 * KiB), 10 * MiB)   # written behind the server's back
        os.fsync(fd)
        with Conn.connect(sock) as c:
            c.handshake("whole", meta=True)
            assert fresh_block_status(c, 10 * MiB, 64 * KiB, w.CMD_FLAG_REQ_ONE) == [(64 * KiB, 0)]
            assert fresh_block_status(c, 20 * MiB, MiB, w.CMD_FLAG_REQ_ONE) == \
                [(MiB, w.STATE_HOLE | w.STATE_ZERO)]
            r = checked_ok(c.read(20 * MiB, MiB))
            assert r.holes == [(20 * MiB, MiB)]
            checked_ok(c.write(30 * MiB, pattern(61, 4 * MiB)))
            checked_ok(c.flush())
            assert os.lseek(fd, 30 * MiB, os.SEEK_DATA) == 30 * MiB
            checked_ok(c.trim(30 * MiB, 4 * MiB))
            checked_ok(c.write_zeroes(10 * MiB, 64 * KiB))
            checked_ok(c.flush())
            assert os.lseek(fd, 30 * MiB, os.SEEK_HOLE) == 30 * MiB
            assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 10 * MiB
            assert os.pread(fd, 4 * MiB, 30 * MiB) == bytes(4 * MiB)
            checked_ok(c.write_zeroes(30 * MiB, MiB, w.CMD_FLAG_NO_HOLE))
            checked_ok(c.flush())
            assert os.lseek(fd, 30 * MiB, os.SEEK_DATA) == 30 * MiB     # provisioned
            assert os.pread(fd, MiB, 30 * MiB) == bytes(MiB)
    finally:
        os.close(fd)


def test_flush_on_one_connection_covers_writes_of_another(file_served):
    srv, sock, path = file_served
    a = Conn.connect(sock)
    b = Conn.connect(sock)
    try:
        assert a.handshake("whole").flags & w.FLAG_CAN_MULTI_CONN
        b.handshake("whole")
        cookies = [a.send_request(w.CMD_WRITE, i * MiB, 64 * KiB, payload=pattern(40 + i, 64 * KiB))
                   for i in range(8)]
        assert sorted(r.cookie for r in map(checked_ok, a.read_replies(8))) == sorted(cookies)
        checked_ok(b.flush())
        for i in range(8):
            assert _pread(path, i * MiB, 64 * KiB) == pattern(40 + i, 64 * KiB)
        assert checked_ok(b.read(3 * MiB, 64 * KiB)).data == pattern(43, 64 * KiB)
    finally:
        a.close()
        b.close()


def test_answered_flush_survives_sigkill_of_the_process(tmp_path):
    path = str(tmp_path / "lun.img")
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    d = short_dir()
    try:
        p = NbdProcess(d, exports=["d=direct"], target=path)
        try:
            with Conn.connect(p.socket) as a, Conn.connect(p.socket) as b:
                assert a.handshake("d").size == 64 * MiB
                b.handshake("d")
                checked_ok(a.write(5 * MiB + 17, pattern(50, 3 * MiB)))
                checked_ok(a.write(63 * MiB, pattern(51, MiB), w.CMD_FLAG_FUA))
                checked_ok(b.flush())
                os.kill(p.pid, signal.SIGKILL)
                p.proc.wait(30)
        finally:
            p.kill()
        assert _pread(path, 5 * MiB + 17, 3 * MiB) == pattern(50, 3 * MiB)
        assert _pread(path, 63 * MiB, MiB) == pattern(51, MiB)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- resize -----------------------------------------------------------------

def test_resize_bigger_is_seen_by_new_connections_only(served):
    served.fill_other()
    old = served.conn()
    try:
        checked_ok(old.write(DISK - 4096, b"o" * 4096))
        served.srv.resize_export("disk", 2 * DISK)
        assert served.srv.exports["disk"].size == 2 * DISK
        assert old.export.size == DISK
        assert old.read(DISK, 4096).error == w.EINVAL          # the old size holds
        assert checked_ok(old.read(DISK - 4096, 4096)).data == b"o" * 4096
        with served.raw() as c:
            c.greet()
            assert c.info("disk").size == 2 * DISK
            assert c.go("disk").size == 2 * DISK
            checked_ok(c.write(2 * DISK - 4096, b"n" * 4096))
            assert checked_ok(c.read(2 * DISK - 4096, 4096)).data == b"n" * 4096
            assert checked_ok(c.read(DISK - 4096, 4096)).data == b"o" * 4096
            assert c.read(2 * DISK, 1).error == w.EINVAL
        checked_ok(old.read(0, 1))
    finally:
        old.close()
    served.assert_other_intact()


def test_ranges_across_a_chunk_boundary(served):
    """"disk" grown past its first 256 MiB chunk takes a chunk after
    "other"'s: reads, writes, hole chunks, block status, trim and zeroing
    across the boundary translate both sides, and "other" is untouched."""
    served.fill_other()
    chunk = 256 * MiB
    served.srv.resize_export("disk", chunk + 64 * MiB)
    with served.conn(meta=True) as c:
        assert c.export.size == chunk + 64 * MiB
        lo, data = chunk - 3 * MiB, pattern(25, 2 * MiB)
        checked_ok(c.write(lo, data))                        # ends 1 MiB before
        checked_ok(c.write(chunk + MiB, data))               # starts 1 MiB after
        r = checked_ok(c.read(lo, 6 * MiB))
        assert r.data == data + bytes(2 * MiB) + data
        assert r.holes and all(lo + 2 * MiB <= o and o + s <= lo + 4 * MiB for o, s in r.holes)
        assert allocation_map(c, lo, 6 * MiB) == [0] * 512 + [w.STATE_HOLE | w.STATE_ZERO] * 512 \
            + [0] * 512
        across = pattern(26, 2 * MiB)
        checked_ok(c.write(chunk - MiB, across))
        assert checked_ok(c.read(chunk - MiB - 5, 2 * MiB + 10)).data == \
            data[-5:] + across + data[:5]
        checked_ok(c.trim(chunk - 512 * KiB, MiB))
        checked_ok(c.write_zeroes(chunk - MiB, 100, w.CMD_FLAG_NO_HOLE))
        got = checked_ok(c.read(chunk - MiB, 2 * MiB)).data
        assert got == bytes(100) + across[100:512 * KiB] + bytes(MiB) + across[1536 * KiB:]
        assert allocation_map(c, chunk - 512 * KiB, MiB) == [w.STATE_HOLE | w.STATE_ZERO] * 256
    served.assert_other_intact()


def test_shrinking_after_the_last_client_left(served):
    """Once a client's DISC has closed its connection, the export is no
    longer held: shrinking succeeds at once, every time."""
    for i in range(20):
        with served.conn(structured=bool(i % 2)) as c:
            checked_ok(c.read(0, 1))
            c.disc()
            c.expect_closed()
        served.srv.resize_export("disk", DISK // 2)
        served.srv.resize_export("disk", DISK)
    with served.raw() as c:
        c.greet()
        assert c.info("disk").size == DISK


def test_shrink_racing_a_go_never_leaves_a_client_beyond_the_end(served, monkeypatch):
    """A shrink that lands after GO told the client its size but before the
    connection counts as connected must still be EBUSY (or GO must tell the
    new size).  The window is widened by delaying _Handshake._info_go's
    return (the ACK is already sent then)."""
    from cxlflash.server import nbd as server_nbd
    chunk = 256 * MiB
    served.srv.resize_export("disk", chunk + 64 * MiB)     # two chunks
    original = server_nbd._Handshake._info_go

    def slow(self, opt, data):
        chosen = original(self, opt, data)
        if chosen is not None:
            time.sleep(0.5)
        return chosen

    monkeypatch.setattr(server_nbd._Handshake, "_info_go", slow)
    outcome = []

    def shrink():
        time.sleep(0.2)
        try:
            served.srv.resize_export("disk", DISK)
            outcome.append("shrunk")
        except OSError as e:
            outcome.append(e.errno)

    with served.raw() as c:
        c.greet()
        t = threading.Thread(target=shrink)
        t.start()
        info = c.go("disk")
        t.join()
        if outcome == ["shrunk"]:
            assert info.size <= DISK, (f"told {info.size} bytes, the export was shrunk to {DISK} "
                                       "meanwhile")
        else:
            assert outcome == [errno.EBUSY]
            data = pattern(27, 4096)
            checked_ok(c.write(info.size - 4096, data))
            assert checked_ok(c.read(info.size - 4096, 4096)).data == data


def test_shrinking_below_a_connected_export_is_ebusy(served):
    with served.conn() as c:
        checked_ok(c.write(DISK - 4096, b"k" * 4096))
        with pytest.raises(OSError) as e:
            served.srv.resize_export("disk", DISK // 2)
        assert e.value.errno == errno.EBUSY
        assert "disk" in str(e.value)
        assert served.srv.exports["disk"].size == DISK
        assert checked_ok(c.read(DISK - 4096, 4096)).data == b"k" * 4096
    with served.conn() as c:
        assert c.export.size == DISK


# -- the command line ---------------------------------------------------------

CLI_BAD = {
    "no-listener": (["--export", "d=1M"], "--unix"),
    "unix-directory-missing": (["--unix", "/nonexistent-dir/s", "--export", "d=1M"],
                               "/nonexistent-dir/s"),
    "tcp-bad-port": (["--tcp", "127.0.0.1:99999", "--export", "d=1M"], "99999"),
    "direct-and-virtual": (["--export", "d=direct", "--export", "v=1M", "--target", "{file}"],
                           "direct"),
    "threads-0": (["--export", "d=1M", "--threads", "0"], "--threads"),
    "tcp-port-in-use": (["--tcp", "127.0.0.1:{port}", "--export", "d=1M"], "{port}"),
    "unix-path-is-a-file": (["--unix", "{file}", "--export", "d=1M"], "{file}"),
    "pid-file-directory-missing": (["--export", "d=1M", "--pid-file", "/nonexistent-dir/pid"],
                                   "/nonexistent-dir/pid"),
    "export-without-size": (["--export", "lonely"], "lonely"),
    "export-without-name": (["--export", "=1M"], "=1M"),
    "size-not-a-number": (["--export", "d=abc"], "abc"),
    "size-bad-suffix": (["--export", "d=1Q"], "1Q"),
    "size-zero": (["--export", "zero=0"], "0"),
    "size-negative": (["--export", "neg=-1M"], "-1M"),
    "duplicate-names": (["--export", "dup=1M", "--export", "dup=2M"], "dup"),
    "direct-without-target": (["--export", "d=direct"], "--target"),
    "no-export": ([], "--export"),
    "target-missing": (["--export", "d=direct", "--target", "/nonexistent/x.img"],
                       "/nonexistent/x.img"),
}


@pytest.mark.parametrize("case", sorted(CLI_BAD))
def test_cli_bad_arguments(case):
    args, needle = CLI_BAD[case]
    d = short_dir()
    try:
        sock = os.path.join(d, "s")
        target = os.path.join(d, "t.img")
        with open(target, "wb") as f:
            f.truncate(256 * MiB)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        args = [a.replace("{file}", target).replace("{port}", port) for a in args]
        needle = needle.replace("{file}", target).replace("{port}", port)
        listen = [] if case == "no-listener" or "--unix" in args else ["--unix", sock]
        pid = [] if "--pid-file" in args else ["--pid-file", os.path.join(d, "pid")]
        try:
            p = subprocess.run([sys.executable, "-m", "cxlflash", "nbd", *listen, *args, *pid],
                               capture_output=True, text=True, timeout=60, env=subprocess_env(),
                               cwd=d, stdin=subprocess.DEVNULL)
        finally:
            busy.close()
        assert p.returncode not in (0, None) and p.returncode > 0, (p.returncode, p.stderr)
        assert "error" in p.stderr and needle in p.stderr, p.stderr
        assert "Traceback" not in p.stderr, p.stderr
        # Flags of other commands are not offered as the way out.
        for other in ("--lun", "--socket", "--nbd"):
            assert other not in p.stderr, p.stderr
        assert not os.path.exists(sock), "a socket was left behind"
        assert not os.path.exists(os.path.join(d, "pid")), "a pid file was left behind"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_cli_sigterm_with_clients_in_the_handshake_exits_promptly():
    d = short_dir()
    try:
        p = NbdProcess(d, exports=["a=1M"])
        try:
            conns = [Conn.connect(p.socket) for _ in range(3)]   # never negotiate
            conns[1].read_greeting()
            t0 = time.monotonic()
            p.stop()
            took = time.monotonic() - t0
            assert took < 5, f"SIGTERM took {took:.1f} s with clients in the handshake"
            for c in conns:
                c.read_until_closed()
                c.close()
        finally:
            if p.status is None:
                p.kill()
        assert not os.path.exists(p.socket)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_cli_sigterm_exits_0_and_removes_socket_and_pid_file():
    d = short_dir()
    try:
        p = NbdProcess(d, exports=["a=1M", "b=2M"])
        try:
            assert os.path.exists(p.socket)
            with Conn.connect(p.socket) as c:        # a client still connected
                c.greet()
                assert sorted(c.list_exports()) == ["a", "b"]
                c.go("b")
                assert c.export.size == 2 * MiB
                checked_ok(c.write(0, b"x"))
                p.stop()
            assert p.status == 0
        finally:
            if p.status is None:
                p.kill()
        assert not os.path.exists(p.socket), p.log()
        assert not os.path.exists(p.pid_file), p.log()
    finally:
        shutil.rmtree(d, ignore_errors=True)
