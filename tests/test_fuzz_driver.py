"""Fuzzing the driver's ioctls (``cxlflash.ioctl`` with uapi structures
whose fields take extreme values), each batch in a subprocess.

An example is a short sequence of ioctls on a fresh "fuzz" context (with
a vLUN and a direct handle of its own), every field of each structure
drawn from values that mean something (the fuzz context's id and
handles, sizes of a few chunks, the access modes) and from extremes (0,
-1 as 2**64-1, 2**63, 2**32, garbage ids, reserved bits, wrong versions),
plus arguments that are not the right structure at all.

After every ioctl:

* only ``CxlFlashError`` (an ``OSError`` with the kernel's errno) escapes;
* a failed ioctl leaves its argument untouched (the kernel's copy-out
  happens only on success);
* a victim context of the same process, whose id is never passed, keeps
  its vLUN: same chunks, same data (a pattern on its first and last blocks);
* every table's ``rht_out`` matches its open handles, and every LUN's
  allocator matches the live LXTs (no chunk freed while mapped, no
  reference lost);
* no backing store changed size;
* AFU_DEBUG copies at most ``data_len`` bytes into the caller's buffer
  and nothing around it.
"""
import ctypes
import errno
import os
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given, note, strategies as st

import cxlflash
import cxlflash.channel
from cxlflash import uapi
from cxlflash._core import pattern
from cxlflash.errors import CxlFlashError

from fuzzing import (EXTREME_INTS, check_allocators, check_tables, close_world,
                     fuzz_settings, live_contexts, run_all, run_batch)

CHUNK = 1 << 16
BS = 512
U64 = 2 ** 64


def blocks(lba, n, seq):
    buf = np.empty(n * BS, dtype=np.uint8)
    pattern.fill(buf, np.arange(lba, lba + n, dtype=np.uint64),
                 np.full(n, seq, dtype=np.uint64), BS)
    return buf


class World:
    """One adapter with three memory LUNs of 512-byte blocks (4, 2 and 1
    chunks) and a victim context holding a vLUN of one chunk on each of the
    first two."""

    def __init__(self):
        self.a = cxlflash.Adapter(port_capacity=1 << 20, port_max_luns=8)
        self.wwids = [self.a.add_lun(None, size=4 * CHUNK * BS, block_size=BS),
                      self.a.add_lun(None, size=2 * CHUNK * BS, block_size=BS),
                      self.a.add_lun(None, size=CHUNK * BS, block_size=BS)]
        self.disks = [self.a.open_disk(w) for w in self.wwids]
        self.victim = self.disks[0].attach()
        self.victim.attach_disk(self.disks[1])
        # LUNs 0 and 1 are in virtual mode (the victim's vLUNs); LUN 2 is
        # for direct handles.
        self.vluns = [self.victim.create_virtual(CHUNK, disk=d, scrub=False)
                      for d in self.disks[:2]]
        self.seqs = {}
        for i, v in enumerate(self.vluns):
            for lba in (0, CHUNK - 8):
                v.write(lba, blocks(lba, 8, 100 + i))
        self.victim_chunks = [self._chunks(v) for v in self.vluns]
        self.backing_fds = [self.a.driver.gluns[w].backing.fd for w in self.wwids[:2]]
        self.sizes = {w: self.a.driver.gluns[w].backing.size for w in self.wwids}
        self.debug_buf = np.full(3 * 262144, 0xEE, dtype=np.uint8)

    def check_in_child(self, what):
        """In a forked child: the driver is the owner's, so only the
        victim's blocks can be checked, on the backing stores inherited."""
        for i, v in enumerate(self.vluns):
            aun = self.victim_chunks[i][0]
            fd = self.backing_fds[i]
            for lba in (0, CHUNK - 8):
                got = os.pread(fd, 8 * BS, (aun * CHUNK + lba) * BS)
                assert pattern.verify(got, lba, np.full(8, 100 + i, np.uint64), BS) == 0, \
                    f"{what}: the victim's data changed (vLUN {i}, LBA {lba}) [child]"
        for w, size in self.sizes.items():
            fd = self.a.driver.gluns[w].backing.fd
            assert os.fstat(fd).st_size == size, f"{what}: a backing store changed size"

    def _chunks(self, v):
        rec = self.a._context_record(v.context.context_id)
        return rec.table.auns(v.handle).tolist()

    def check(self, what):
        if self.a._client() is not None:
            return self.check_in_child(what)
        a = self.a
        ids = {c.ctxid for c in live_contexts(a)}
        assert self.victim.context_id in ids, f"{what}: the victim context is gone"
        for i, v in enumerate(self.vluns):
            assert self._chunks(v) == self.victim_chunks[i], \
                f"{what}: the victim's vLUN {i} changed chunks"
            for lba in (0, CHUNK - 8):
                got = v.read(lba, 8)
                assert pattern.verify(got, lba, np.full(8, 100 + i, np.uint64), BS) == 0, \
                    f"{what}: the victim's data changed (vLUN {i}, LBA {lba})"
        for d in self.disks:
            llun = d.sdev.llun
            assert llun is None or llun.parent is a.driver.gluns[d.wwid], \
                f"{what}: disk {d.wwid.hex()} now reaches LUN {llun.parent.wwid.hex()}"
        check_tables(a)
        check_allocators(a)
        for w, size in self.sizes.items():
            g = a.driver.gluns.get(w)
            assert g is not None and g.backing.size == size, \
                f"{what}: the backing store of LUN {w.hex()} changed size"


_WORLD = None


def world():
    global _WORLD
    if _WORLD is None:
        _WORLD = World()
    return _WORLD


def drop_world():
    """After a failed example: the next one starts from a fresh adapter
    (so hypothesis shrinks against a clean state)."""
    global _WORLD
    w, _WORLD = _WORLD, None
    close_world(w)


# -- field values -------------------------------------------------------------------

ID_KINDS = ["fuzz", "fuzz", "fuzz", "other_fuzz", "zero", "all_ones", "cookie_flip",
            "pe_plus", "extreme"]
HANDLE_KINDS = ["hv", "hv", "hd", "small", "extreme"]


@st.composite
def field_values(draw, name, ctype):
    """A value for field ``name`` of C type ``ctype`` (an int, or bytes
    for an array of uint8); symbolic ids are resolved at call time."""
    if name in ("context_id", "context_id_src", "context_id_dst"):
        return ("id", draw(st.sampled_from(ID_KINDS)), draw(st.sampled_from(EXTREME_INTS)))
    if name == "rsrc_handle":
        return ("handle", draw(st.sampled_from(HANDLE_KINDS)),
                draw(st.one_of(st.integers(0, 5), st.sampled_from(EXTREME_INTS))))
    if name in ("lun_size", "req_size"):
        # 4K blocks; with 512-byte native blocks a chunk is 8192 of them.
        return draw(st.one_of(st.sampled_from([0, 1, 8191, 8192, 8193, 16384, 32768,
                                               40000, 8192 * 5]),
                              st.sampled_from(EXTREME_INTS)))
    if name == "flags":
        return draw(st.one_of(
            st.sampled_from([0, os.O_RDONLY, os.O_WRONLY, os.O_RDWR, 3,
                             uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT | os.O_RDWR,
                             uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME,
                             uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE,
                             uapi.DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE,
                             uapi.HT_CXLFLASH_HOST_WRITE]),
            st.sampled_from(EXTREME_INTS)))
    if name in ("version", "rsvd", "return_flags", "reserved", "reserved8",
                "reserved16", "reserved32", "pad"):
        return draw(st.one_of(st.just(0), st.just(0), st.just(0), st.just(0),
                              st.sampled_from([1, 0xFFFF, U64 - 1])))
    if name == "wwid":
        return ("wwid", draw(st.sampled_from(["own", "other", "zero", "junk"])))
    if name == "data_ea":
        return ("ea", draw(st.sampled_from(["buf", "buf", "buf_end", "zero", "low",
                                            "kernel", "extreme"])))
    if name == "data_len":
        return draw(st.sampled_from([0, 1, 16, 4096, 262144, 262145, 2 ** 31, 2 ** 32 - 1]))
    if name == "port":
        return draw(st.sampled_from([0, 1, 2, 3, 4, 0xFFFF]))
    if name == "subcmd":
        return draw(st.sampled_from([1, 1, 2, 3, 0, 4, 0xFFFF]))
    if name == "size":               # LUN_PROVISION, 4K blocks
        return draw(st.sampled_from([0, 1, 8192, 16384, 1 << 20, (1 << 20) + 1,
                                     2 ** 32, U64 - 1]))
    if name == "lun_id":
        return ("lun_id", draw(st.sampled_from(["created", "victim", "junk"])))
    if name == "num_interrupts":
        return draw(st.sampled_from([0, 1, 4, 5, U64 - 1]))
    if name == "hint":
        return draw(st.sampled_from([0, uapi.DK_CXLFLASH_VERIFY_HINT_SENSE, 1, U64 - 1]))
    if name in ("afu_subcmd", "sense_data"):
        return bytes(draw(st.lists(st.integers(0, 255), min_size=1, max_size=4)))
    return draw(st.one_of(st.just(0), st.sampled_from(EXTREME_INTS)))


@st.composite
def sane_values(draw, name, req):
    """A value that makes sense for field ``name`` of request ``req`` (None:
    leave the zero the structure starts with)."""
    if name in ("context_id", "context_id_src", "context_id_dst"):
        return ("id", draw(st.sampled_from(["fuzz", "fuzz", "other_fuzz"])), 0)
    if name == "rsrc_handle":
        return ("handle", draw(st.sampled_from(["hv", "hv", "hd", "small"])),
                draw(st.integers(0, 5)))
    if name in ("lun_size", "req_size"):
        return draw(st.sampled_from([0, 1, 8192, 8193, 16384]))
    if name == "flags":
        if req == uapi.DK_CXLFLASH_MANAGE_LUN:
            return draw(st.sampled_from([uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE,
                                         uapi.DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE]))
        if req == uapi.DK_CXLFLASH_USER_VIRTUAL:
            return draw(st.sampled_from([0, uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME]))
        if req in (uapi.DK_CXLFLASH_ATTACH, uapi.DK_CXLFLASH_VLUN_CLONE):
            return draw(st.sampled_from([os.O_RDWR, os.O_RDONLY, os.O_WRONLY,
                                         uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT | os.O_RDWR]))
        return None
    if name == "wwid":
        return ("wwid", draw(st.sampled_from(["own", "own", "other"])))
    if name == "data_ea":
        return ("ea", "buf")
    if name == "data_len":
        return draw(st.sampled_from([0, 16, 4096]))
    if name == "subcmd":
        return draw(st.sampled_from([1, 2, 3]))
    if name == "size":
        return draw(st.sampled_from([8192, 16384]))
    if name == "lun_id":
        return ("lun_id", "created")
    if name in ("hint", "afu_subcmd", "num_interrupts", "port"):
        return draw(field_values(name, None)) if draw(st.booleans()) else None
    return None


DK_REQUESTS = [uapi.DK_CXLFLASH_ATTACH, uapi.DK_CXLFLASH_USER_DIRECT,
               uapi.DK_CXLFLASH_RELEASE, uapi.DK_CXLFLASH_DETACH, uapi.DK_CXLFLASH_VERIFY,
               uapi.DK_CXLFLASH_RECOVER_AFU, uapi.DK_CXLFLASH_MANAGE_LUN,
               uapi.DK_CXLFLASH_USER_VIRTUAL, uapi.DK_CXLFLASH_VLUN_RESIZE,
               uapi.DK_CXLFLASH_VLUN_CLONE]
HT_REQUESTS = [uapi.HT_CXLFLASH_LUN_PROVISION, uapi.HT_CXLFLASH_AFU_DEBUG]
BAD_REQUESTS = [0, 1, uapi.DK_CXLFLASH_ATTACH + 1, U64 - 1, U64, -1]


def _leaf_fields(struct_type, prefix=()):
    for name, ctype in struct_type._fields_:
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            yield from _leaf_fields(ctype, prefix + (name,))
        else:
            yield prefix + (name,), ctype


@st.composite
def ioctl_calls(draw):
    kind = draw(st.sampled_from(["dk"] * 8 + ["ht"] * 2 + ["bad_request", "bad_arg",
                                                          "io"]))
    if kind == "io":
        return ("io", None, None, {}, 0, None)
    if kind == "bad_request":
        return ("dk", draw(st.sampled_from(BAD_REQUESTS)), uapi.dk_cxlflash_attach, {},
                draw(st.sampled_from([0, 1])), "struct")
    req = draw(st.sampled_from(DK_REQUESTS if kind != "ht" else HT_REQUESTS))
    table = uapi.DK_IOCTLS if req in uapi.DK_IOCTLS else uapi.HT_IOCTLS
    stype = table[req]
    fields = {}
    leaves = list(_leaf_fields(stype))
    # Sane calls get somewhere (and change state the next calls work on);
    # then one field extreme, or many.
    mode = draw(st.sampled_from(["sane", "sane", "sane", "one", "one", "many"]))
    odd = draw(st.integers(0, len(leaves) - 1))
    for i, (path, ctype) in enumerate(leaves):
        extreme = mode == "many" and draw(st.booleans()) or (mode == "one" and i == odd)
        if extreme:
            fields[path] = draw(field_values(path[-1], ctype))
        else:
            v = draw(sane_values(path[-1], req))
            if v is not None:
                fields[path] = v
    arg_kind = "struct"
    if kind == "bad_arg":
        arg_kind = draw(st.sampled_from(["short", "bytes", "none", "int", "wrong_struct",
                                         "readonly_view"]))
    disk = draw(st.sampled_from([0, 0, 1, 2]))
    return ("dk" if req in uapi.DK_IOCTLS else "ht", req, stype, fields, disk, arg_kind)


class Fuzz:
    """The per-example state: the fuzz contexts, their fds, created LUNs."""

    def __init__(self, w):
        self.w = w
        self.ctxs = [w.disks[0].attach(), w.disks[2].attach()]
        self.ctxs[0].attach_disk(w.disks[1])
        self.ctxs[1].attach_disk(w.disks[0])
        self.hv = self.ctxs[0].create_virtual(CHUNK, scrub=False)
        self.hd = self.ctxs[1].open_direct()
        self.fds = []
        self.created = []

    def resolve(self, name, v):
        w = self.w
        if not isinstance(v, tuple):
            return v
        tag = v[0]
        if tag == "id":
            kind, extreme = v[1], v[2] % U64
            cid = self.ctxs[0].context_id
            val = {"fuzz": cid, "other_fuzz": self.ctxs[1].context_id, "zero": 0,
                   "all_ones": U64 - 1, "cookie_flip": cid ^ (1 << 40),
                   "pe_plus": cid + 1, "extreme": extreme}[kind]
            if val == w.victim.context_id:
                val = cid
            return val
        if tag == "handle":
            kind, x = v[1], v[2] % U64
            return {"hv": self.hv.handle, "hd": self.hd.handle, "small": x % 8,
                    "extreme": x}[kind]
        if tag == "wwid":
            return {"own": w.wwids[0], "other": w.wwids[1], "zero": bytes(16),
                    "junk": bytes(range(16))}[v[1]]
        if tag == "ea":
            base = w.debug_buf.ctypes.data + 262144
            return {"buf": base, "buf_end": base + 262144 - 16, "zero": 0, "low": 8,
                    "kernel": U64 - 4096, "extreme": U64 - 1}[v[1]]
        if tag == "lun_id":
            if v[1] == "created" and self.created:
                return self.created[-1][1]
            return {"victim": 1, "junk": 0xDEAD}.get(v[1], 0)
        raise AssertionError(v)

    def build(self, call):
        _, req, stype, fields, disk, arg_kind = call
        s = stype()
        for path, v in fields.items():
            target = s
            for p in path[:-1]:
                target = getattr(target, p)
            v = self.resolve(path[-1], v)
            cur = getattr(target, path[-1])
            if isinstance(cur, ctypes.Array):
                if isinstance(v, bytes):
                    for i in range(min(len(cur), len(v))):
                        cur[i] = v[i]
                else:
                    mask = (1 << (8 * ctypes.sizeof(cur._type_))) - 1
                    for i in range(len(cur)):
                        cur[i] = v % U64 & mask
            else:
                setattr(target, path[-1], v % U64 if isinstance(v, int) else v)
        if arg_kind == "struct":
            return s
        if arg_kind == "short":
            return bytearray(bytes(s)[:ctypes.sizeof(s) // 2])
        if arg_kind == "bytes":
            return bytes(s)
        if arg_kind == "none":
            return None
        if arg_kind == "int":
            return 7
        if arg_kind == "wrong_struct":
            return uapi.dk_cxlflash_detach()
        return memoryview(bytes(s))

    def write_everywhere(self):
        """Write through every open handle of every fuzz context (the ioctl
        level data path): after MANAGE_LUN, CLONE, RESIZE... nothing may
        land in the victim's chunks."""
        w = self.w
        me = os.getpid()
        data = blocks(0, 8, 55)
        remote = w.a._client()
        contexts = list(remote.replicas.values()) if remote is not None \
            else live_contexts(w.a)
        for c in contexts:
            if c.ctxid == w.victim.context_id or c.pid != me:
                continue
            t = c.table
            for h in t.open_handles():
                n = t.extent(h)
                for lba in {0, max(n - 8, 0)} | {k * CHUNK for k in range(min(n // CHUNK, 8))}:
                    try:
                        w.a.write(c.ctxid, h, lba, data)
                    except OSError:
                        pass

    def cleanup(self):
        w = self.w
        for c in self.ctxs:
            try:
                c.close()
            except Exception:          # noqa: BLE001
                pass
        me = os.getpid()
        child = w.a._client() is not None
        for c in ([] if child else live_contexts(w.a)):
            if c.ctxid != w.victim.context_id and c.pid == me:
                # A context the fuzz attached by hand: detach it as its fd's
                # release would.
                for d in w.disks:
                    det = uapi.dk_cxlflash_detach()
                    det.context_id = c.ctxid
                    try:
                        cxlflash.ioctl(d, uapi.DK_CXLFLASH_DETACH, det)
                    except CxlFlashError:
                        pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for port, lun_id in self.created:
            arg = uapi.ht_cxlflash_lun_provision()
            arg.hdr.subcmd = uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_DELETE_LUN
            arg.port, arg.lun_id = port, lun_id
            try:
                cxlflash.ioctl(w.a, uapi.HT_CXLFLASH_LUN_PROVISION, arg)
            except CxlFlashError:
                pass
        if child:
            # Contexts attached by hand: their fds were closed above; the
            # owner releases them (at its next ioctl, or when we exit).
            return
        # The fds just closed are released at the next ioctl (reap).
        w.a.driver.reap(cxlflash.channel.this_process())
        for d in w.disks:                 # a DISABLE_SUPERPIPE that went through
            if d.sdev.llun is None:
                w.a.driver.enable_superpipe(d.sdev)


@fuzz_settings(max_examples=200)
@given(calls=st.lists(ioctl_calls(), min_size=1, max_size=6))
# Item 11: MANAGE_LUN re-pointing a disk at another LUN's WWID, then a vLUN
# opened through it and written.
@example(calls=[("dk", uapi.DK_CXLFLASH_MANAGE_LUN, uapi.dk_cxlflash_manage_lun,
                 {("hdr", "flags"): uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE,
                  ("wwid",): ("wwid", "other")}, 0, "struct"),
                ("dk", uapi.DK_CXLFLASH_USER_VIRTUAL, uapi.dk_cxlflash_uvirtual,
                 {("context_id",): ("id", "fuzz", 0), ("lun_size",): 16384}, 0, "struct"),
                ("io", None, None, {}, 0, None)])
def _ioctls(calls):
    try:
        _run_ioctls(calls)
    except BaseException:
        drop_world()
        raise


def _run_ioctls(calls):
    w = world()
    f = Fuzz(w)
    try:
        for call in calls:
            kind, req, stype, fields, disk_i, arg_kind = call
            if kind == "io":
                f.write_everywhere()
                w.check("writes through every handle of the fuzz contexts")
                continue
            arg = f.build(call)
            before = bytes(arg) if isinstance(arg, (ctypes.Structure, bytearray)) else None
            guard = w.debug_buf.copy()
            target = w.disks[disk_i] if kind == "dk" else w.a
            name = uapi.IOCTL_NAMES.get(req, hex(req % U64)) if isinstance(req, int) else req
            what = f"{name} {arg_kind} {arg!r}"
            note(what)
            try:
                cxlflash.ioctl(target, req, arg)
                ok = True
            except CxlFlashError as e:
                ok = False
                note(f"  -> {e!r}")
                assert e.errno and e.strerror, f"{what}: an error without errno/message"
            except Exception as e:            # noqa: BLE001
                raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e
            if not ok:
                if before is not None:
                    assert bytes(arg) == before, f"{what} failed but changed its argument"
            else:
                note("  -> ok")
                if req == uapi.DK_CXLFLASH_ATTACH or (
                        req == uapi.DK_CXLFLASH_RECOVER_AFU and arg.hdr.return_flags &
                        uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET):
                    fd = arg.adap_fd
                    reuse = req == uapi.DK_CXLFLASH_ATTACH and \
                        arg.hdr.flags & uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT
                    if reuse and fd == U64 - 1:
                        fd = -1                   # no new fd for a reused context
                    else:
                        assert 0 <= fd < 2 ** 31, f"{what} returned adap_fd {fd}"
                    if fd >= 0 and fd not in (f.ctxs[0].adap_fd, f.ctxs[1].adap_fd,
                                              w.victim.adap_fd):
                        f.fds.append(fd)
                if req == uapi.HT_CXLFLASH_LUN_PROVISION and \
                        arg.hdr.subcmd == uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_CREATE_LUN:
                    f.created.append((arg.port, arg.lun_id))
            if req == uapi.HT_CXLFLASH_AFU_DEBUG and isinstance(arg, ctypes.Structure):
                ea, n = arg.data_ea, arg.data_len
                base = w.debug_buf.ctypes.data
                lo, hi = ea - base, ea - base + n
                changed = np.flatnonzero(w.debug_buf != guard)
                if len(changed):
                    assert ok, f"{what} failed but wrote into the caller's memory"
                    assert lo <= changed[0] and changed[-1] < hi, \
                        f"{what} wrote outside [data_ea, data_ea + data_len)"
                w.debug_buf[:] = 0xEE
            w.check(what)
    finally:
        f.cleanup()
    w.check("after the example's cleanup")


def batch_ioctls():
    run_all(_ioctls)


@fuzz_settings(max_examples=60)
@given(calls=st.lists(ioctl_calls(), min_size=1, max_size=5))
def _child_ioctls(calls):
    _run_ioctls(calls)


def batch_child_ioctls():
    """The same ioctls from a forked child: they travel to the owner's
    driver over the fork socket (cxlflash/server) and come back with the
    child's replicas.  The child checks the victim's blocks on the backing
    store; the owner then checks its driver (tables, allocators, victim)."""
    from forking import in_child
    w = world()
    w.check("before the child")

    def child():
        _child_ioctls()
        return "ok"

    assert in_child(child) == "ok"
    me = cxlflash.channel.this_process()
    for _ in range(200):                      # the child's contexts go with it
        w.a.driver.reap(me)
        if all(c.pid == os.getpid() for c in live_contexts(w.a)):
            break
        time.sleep(0.01)
    for d in w.disks:
        if d.sdev.llun is None:
            w.a.driver.enable_superpipe(d.sdev)
    w.check("after the child's fuzz")


# -- the ioctl-level data path ---------------------------------------------------------


@fuzz_settings(max_examples=150)
@given(op=st.sampled_from(["read", "readinto", "write", "translate"]),
       cid=st.sampled_from(ID_KINDS),
       cid_extreme=st.sampled_from(EXTREME_INTS + [None, 1.5, "0"]),
       handle=st.one_of(st.sampled_from(["hv", "hd"]), st.sampled_from(EXTREME_INTS),
                        st.sampled_from([None, 0.0, "1"])),
       lba=st.one_of(st.integers(0, 4), st.sampled_from([CHUNK - 1, CHUNK, 4 * CHUNK - 1,
                                                         4 * CHUNK]),
                     st.sampled_from(EXTREME_INTS), st.sampled_from([None, 0.5, 1.0, "0"])),
       n=st.one_of(st.integers(0, 3), st.sampled_from([2 ** 18, 2 ** 48, 2 ** 52 + 1, U64 - 1,
                                                       U64, -1]),
                   st.sampled_from([None, 1.5])),
       buf_kind=st.sampled_from(["bytearray", "numpy", "bytes", "strided", "readonly",
                                 "empty"]))
@example(op="read", cid="fuzz", cid_extreme=0, handle="hv", lba=0, n=2 ** 52 + 1,
         buf_kind="bytearray")
@example(op="read", cid="zero", cid_extreme=0, handle="hv", lba=0, n=2 ** 18,
         buf_kind="bytearray")
@example(op="write", cid="fuzz", cid_extreme=0, handle="hv", lba=-1, n=1,
         buf_kind="bytearray")
@example(op="write", cid="fuzz", cid_extreme=0, handle="hv", lba=0.5, n=1,
         buf_kind="bytearray")
def _adapter_io(op, cid, cid_extreme, handle, lba, n, buf_kind):
    """Adapter.read / readinto / write / translate with extreme arguments:
    OverflowError and MemoryError never escape; a float is a TypeError;
    a refused call changes no block."""
    try:
        _run_adapter_io(op, cid, cid_extreme, handle, lba, n, buf_kind)
    except BaseException:
        drop_world()
        raise


def _run_adapter_io(op, cid, cid_extreme, handle, lba, n, buf_kind):
    w = world()
    f = Fuzz(w)
    try:
        if cid == "extreme":
            context_id = cid_extreme
        else:
            context_id = f.resolve("context_id", ("id", cid, 0))
        h = {"hv": f.hv.handle, "hd": f.hd.handle}.get(handle, handle) \
            if isinstance(handle, str) else handle
        if context_id == f.ctxs[0].context_id and h == f.hd.handle:
            h = f.hv.handle
        f.hv.write(0, blocks(0, 4, 9))
        k = n if isinstance(n, int) and 0 <= n <= 3 else 1
        raw = {"bytearray": lambda: bytearray(blocks(0, k, 7).tobytes()),
               "numpy": lambda: blocks(0, k, 7),
               "bytes": lambda: blocks(0, k, 7).tobytes(),
               "strided": lambda: np.repeat(blocks(0, k, 7), 2)[::2],
               "readonly": lambda: np.frombuffer(blocks(0, k, 7).tobytes(), np.uint8),
               "empty": lambda: bytearray()}[buf_kind]()
        what = f"adapter.{op}({context_id!r}, {h!r}, {lba!r}, n={n!r}, {buf_kind})"
        note(what)
        peak = 0
        try:
            if op == "read":
                tracemalloc.start()
                try:
                    res = w.a.read(context_id, h, lba, n)
                finally:
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
            elif op == "readinto":
                res = w.a.readinto(context_id, h, lba, raw)
            elif op == "write":
                res = w.a.write(context_id, h, lba, raw)
            else:
                res = w.a.translate(context_id, h, [lba] if not isinstance(lba, str) else lba)
            ok = True
        except (OSError, TypeError, ValueError, BufferError) as e:
            ok = False
            note(f"  -> {e!r}")
            if isinstance(e, OverflowError):
                raise AssertionError(f"{what}: OverflowError escaped: {e}")
            assert str(e), f"{what}: an error with no message"
        except Exception as e:                  # noqa: BLE001
            raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e
        if op == "read" and not ok:
            # Validation happens before any allocation (issue 8, item 13:
            # Adapter.read(ctx, h, 0, 2**18) allocated 1 GiB before refusing).
            assert peak < 8 << 20, f"{what}: allocated {peak} bytes before refusing"
        passed = (context_id, h, lba, n) if op == "read" else (context_id, h, lba)
        floats = [x for x in passed if isinstance(x, float)]
        if ok:
            assert not floats, f"{what} accepted a float"
            if op == "read":
                assert len(res) == n * BS, f"{what} returned {len(res)} bytes"
        if not (ok and op == "write"):
            got = f.hv.read(0, 4)
            assert pattern.verify(got, 0, np.full(4, 9, np.uint64), BS) == 0, \
                f"{what}: the vLUN changed"
        w.check(what)
    finally:
        f.cleanup()


def batch_adapter_io():
    run_all(_adapter_io)


@pytest.mark.parametrize("batch", ["batch_ioctls", "batch_child_ioctls", "batch_adapter_io"])
def test_fuzz_driver(batch):
    run_batch("test_fuzz_driver", batch)
