"""The NBD export's edges (issue 11), through libnbd.

libnbd's Python binding (Debian's python3-libnbd) imports only under
Debian's own ``/usr/bin/python3``, not under the project's Python: each
check is a small script run there (``libnbd(server, SCRIPT, ...)``) that
prints its results as JSON, and the assertions are made here.  The
scripts turn libnbd's client-side checks off (``set_strict_mode(0)``)
where the point is what the server answers.
"""
import base64
import errno
import json
import os
import subprocess
import time

from nbd_servers import NbdProcess

MiB = 1 << 20
KiB = 1 << 10
DEBIAN_PYTHON = "/usr/bin/python3"

# Shared by every script: connect(), an errno catcher, block status as
# merged [start, end, flags] runs, and base64 for bytes.
PRELUDE = r'''
import base64, errno, json, os, sys
import nbd

def connect(uri, meta=True, structured=True, strict=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.set_request_structured_replies(structured)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h

def errnum(fn, *args, **kw):
    """None if the call succeeds, else the errno of its nbd.Error."""
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        return [e.errnum, e.string]
    return None

def status(h, offset, count):
    """base:allocation over [offset, offset+count): merged [start, end, flags]."""
    runs = []
    pos = offset
    end = offset + count
    while pos < end:
        got = []
        def cb(metacontext, off, entries, err):
            assert metacontext == "base:allocation", metacontext
            got.append((off, list(entries)))
            return 0
        h.block_status(end - pos, pos, cb)
        assert got, "no extents"
        off, entries = got[0]
        assert off == pos, (off, pos)
        for i in range(0, len(entries), 2):
            n, fl = entries[i], entries[i + 1]
            s, e = pos, min(pos + n, end)
            if runs and runs[-1][2] == fl and runs[-1][1] == s:
                runs[-1][1] = e
            else:
                runs.append([s, e, fl])
            pos = e
            if pos >= end:
                break
    return runs

def b64(b):
    return base64.b64encode(bytes(b)).decode()

def pause():
    """Hands ``out`` to the test (libnbd_paused) and waits for its go-on,
    connections still open."""
    global out
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    assert sys.stdin.readline() == "go\n"
    out = {}

out = {}
'''


def libnbd(server, script, *args, timeout=120):
    """Runs PRELUDE + script under Debian's python3 with ``args`` as
    sys.argv[1:]; the script fills the dict ``out``, printed as JSON."""
    code = PRELUDE + script + "\nprint(json.dumps(out))\n"
    p = subprocess.run([DEBIAN_PYTHON, "-c", code, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, (f"libnbd script exited {p.returncode}\nstdout:\n{p.stdout}\n"
                               f"stderr:\n{p.stderr}\nserver log:\n{server.log()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class libnbd_paused:
    """``with libnbd_paused(server, script, *args) as first:`` runs a script
    that calls ``pause()`` once: ``first`` is ``out`` at the pause (the
    script's connections still open); leaving the block lets it go on, and
    ``.final`` is its last ``out``."""

    def __init__(self, server, script, *args, timeout=120):
        self.server = server
        self.timeout = timeout
        code = PRELUDE + script + "\nprint(json.dumps(out))\n"
        self.proc = subprocess.Popen([DEBIAN_PYTHON, "-c", code, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"libnbd script ended before its pause:\n{err}\n"
                                 f"server log:\n{self.server.log()}")
        return json.loads(line)

    def __exit__(self, *exc):
        try:
            out, err = self.proc.communicate("go\n", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"libnbd script hung after its pause:\n{err}") from None
        if exc[0] is None:
            assert self.proc.returncode == 0, (
                f"libnbd script exited {self.proc.returncode}\n{err}\n"
                f"server log:\n{self.server.log()}")
            self.final = json.loads(out.strip().splitlines()[-1])


def unb64(s):
    return base64.b64decode(s)


HOLE_ZERO = 3   # NBD_STATE_HOLE | NBD_STATE_ZERO
DATA = 0


# -- handle properties, structured replies, negotiation --------------------

def test_size_flags_and_block_sizes_as_libnbd_sees_them(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1])
out["size"] = h.get_size()
for f in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero",
          "can_fast_zero", "can_cache", "can_df", "is_read_only"):
    out[f] = bool(getattr(h, f)())
out["meta"] = bool(h.can_meta_context("base:allocation"))
out["structured"] = bool(h.get_structured_replies_negotiated())
out["protocol"] = h.get_protocol()
out["bs"] = [h.get_block_size(t) for t in
             (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
out["name"] = h.get_export_name()
h.shutdown()
''', s.uri("disk"))
        assert r["size"] == 64 * MiB
        for f in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero",
                  "can_fast_zero", "can_cache", "can_df", "meta", "structured"):
            assert r[f] is True, (f, r)
        assert r["is_read_only"] is False
        assert r["protocol"] == "newstyle-fixed"
        assert r["bs"] == [1, 4096, 32 * MiB]
        assert r["name"] == "disk"


def test_structured_replies_off(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1], meta=False, structured=False, strict=False)
out["structured"] = bool(h.get_structured_replies_negotiated())
out["can_df"] = bool(h.can_df())
data = bytes(range(256)) * 1024            # 256 KiB
h.pwrite(data, 8192)
out["back"] = h.pread(len(data), 8192) == data
out["big"] = b64(h.pread(1 << 20, 0))       # data and never-written parts
out["oor"] = errnum(h.pread, 4096, h.get_size())
out["after"] = h.pread(4096, 8192) == data[:4096]
h.shutdown()
''', s.uri("disk"))
        assert r["structured"] is False
        assert r["can_df"] is False
        assert r["back"] is True
        big = unb64(r["big"])
        want = bytes(8192) + bytes(range(256)) * 1024
        assert big == want + bytes(MiB - len(want))
        assert r["oor"] is not None and r["oor"][0] == errno.EINVAL, r["oor"]
        assert r["after"] is True, "the connection survives an error reply"


def test_structured_reads_over_holes_and_df(tmp_path):
    """Reads of >= 64 KiB over data and holes (OFFSET_DATA and OFFSET_HOLE
    chunks) come back right, with and without DF."""
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1])
out["df"] = bool(h.can_df())
h.pwrite(b"\x42" * 65536, 1 << 20)
h.pwrite(b"\x24" * 100, 3 << 20)
out["plain"] = b64(h.pread(4 << 20, 0))
def read_chunks(flags):
    chunks = []
    def chunk(buf, off, st, err):
        chunks.append([off, len(buf), st, st == nbd.READ_HOLE and bytes(buf) != bytes(len(buf))])
        return 0
    data = h.pread_structured(4 << 20, 0, chunk, flags=flags)
    return b64(data), chunks
out["df_read"], out["df_chunks"] = read_chunks(nbd.CMD_FLAG_DF)
out["st_read"], out["chunks"] = read_chunks(0)
out["HOLE"] = nbd.READ_HOLE
out["DATA"] = nbd.READ_DATA
h.shutdown()
''', s.uri("disk"))
        want = bytearray(4 * MiB)
        want[MiB:MiB + 65536] = b"\x42" * 65536
        want[3 * MiB:3 * MiB + 100] = b"\x24" * 100
        assert r["df"] is True
        assert unb64(r["plain"]) == want
        assert unb64(r["df_read"]) == want
        assert unb64(r["st_read"]) == want
        # DF (don't fragment): the whole read in one data chunk.
        assert r["df_chunks"] == [[0, 4 * MiB, r["DATA"], False]], r["df_chunks"]
        # Without DF the chunks tile the read exactly, and the never-written
        # parts may come as hole chunks (which libnbd presents as zeros).
        cover = sorted(r["chunks"])
        pos = 0
        for o, n, kind, nonzero in cover:
            assert o == pos, cover
            assert not nonzero, cover
            if kind == r["HOLE"]:
                assert not any(want[o:o + n]), f"a hole chunk over data at {o}: {cover}"
            pos += n
        assert pos == 4 * MiB
        assert any(kind == r["HOLE"] for _, _, kind, _ in cover), \
            f"no hole chunk for a read over 3 MiB of never-written space: {cover}"


def test_opt_mode_list_info_and_go(tmp_path):
    sizes = {"alpha": 8 * MiB, "beta": 24 * MiB, "gamma": 4096}
    with NbdProcess(tmp_path, exports=[f"{n}={v}" for n, v in sizes.items()]) as s:
        r = libnbd(s, r'''
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
names = []
out["count"] = h.opt_list(lambda name, desc: names.append(name))
out["names"] = names
info = {}
for n in names:
    h.set_export_name(n)
    h.opt_info()
    info[n] = h.get_size()
out["info"] = info
ctx = []
h.set_export_name("beta")
out["nctx"] = h.opt_list_meta_context(lambda c: ctx.append(c))
out["ctx"] = ctx
h.set_export_name("nosuch")
out["unknown"] = errnum(h.opt_info)
h.set_export_name("beta")
h.opt_go()
out["go_size"] = h.get_size()
out["meta"] = bool(h.can_meta_context("base:allocation"))
h.pwrite(b"x" * 10, 0)
out["read"] = h.pread(10, 0).decode()
h.shutdown()
''', s.uri(""))
        assert sorted(r["names"]) == sorted(sizes) and r["count"] == len(sizes), r
        assert r["info"] == sizes
        assert "base:allocation" in r["ctx"], r
        assert r["unknown"] is not None, "opt_info of an unknown export succeeded"
        assert r["go_size"] == sizes["beta"]
        assert r["meta"] is True
        assert r["read"] == "x" * 10


def test_unknown_export_and_the_empty_name(tmp_path):
    with NbdProcess(tmp_path, exports=["first=8M", "second=16M"]) as s:
        r = libnbd(s, r'''
h = nbd.NBD()
out["unknown"] = errnum(h.connect_uri, sys.argv[1])
del h
h = connect(sys.argv[2])
out["empty_size"] = h.get_size()
h.pwrite(b"\x99" * 4096, 4096)
h.shutdown()
h = connect(sys.argv[3])
out["first"] = h.pread(4096, 4096) == b"\x99" * 4096
h.shutdown()
h = connect(sys.argv[4])
out["second_zero"] = h.pread(4096, 4096) == bytes(4096)
h.shutdown()
''', s.uri("nosuch"), s.uri(""), s.uri("first"), s.uri("second"))
        assert r["unknown"] is not None, "connecting to an unknown export succeeded"
        assert r["empty_size"] == 8 * MiB, "the empty name is the first export"
        assert r["first"] is True
        assert r["second_zero"] is True, "a write to one export showed in another"


# -- bounds, alignment, FUA ------------------------------------------------

def test_out_of_range_requests_are_einval(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1], strict=False)
size = h.get_size()
h.pwrite(b"\x07" * 8192, size - 8192)
res = {}
res["pread_at_end"] = errnum(h.pread, 4096, size)
res["pread_straddle"] = errnum(h.pread, 4096, size - 2048)
res["pread_far"] = errnum(h.pread, 512, 1 << 50)
res["pwrite_at_end"] = errnum(h.pwrite, b"\xee" * 4096, size)
res["pwrite_straddle"] = errnum(h.pwrite, b"\xee" * 4096, size - 2048)
res["trim_straddle"] = errnum(h.trim, 8192, size - 4096)
res["zero_straddle"] = errnum(h.zero, 8192, size - 4096)
res["cache_past"] = errnum(h.cache, 4096, size)
res["status_past"] = errnum(h.block_status, 4096, size, lambda *a: 0)
out["res"] = res
out["tail"] = b64(h.pread(8192, size - 8192))
out["ok"] = errnum(h.pread, 4096, size - 4096)
h.shutdown()
''', s.uri("disk"))
        for what, e in r["res"].items():
            assert e is not None, f"{what}: succeeded past the end"
            # The spec: EINVAL for reads, trims, block status; writes and
            # write-zeroes SHOULD be ENOSPC (nbd-api.md says EINVAL for all).
            if what.startswith(("pwrite", "zero")):
                assert e[0] in (errno.EINVAL, errno.ENOSPC), (what, e)
            else:
                assert e[0] == errno.EINVAL, (what, e)
        assert unb64(r["tail"]) == b"\x07" * 8192, "a refused request changed the data"
        assert r["ok"] is None


def test_unaligned_reads_and_writes(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1])
h.pwrite(b"\x11" * 65536, 0)
h.pwrite(b"\xab" * 4095, 1)
out["a"] = b64(h.pread(8192, 0))
h.pwrite(bytes(range(256)) * 2 + b"\xfe", 4000)      # 513 bytes at 4000
out["b"] = b64(h.pread(65536, 0))
out["c"] = b64(h.pread(513, 4000))
out["d"] = b64(h.pread(3, 4095))
h.pwrite(b"\x5e" * 7, (1 << 20) - 3)                 # across a 1 MiB boundary
out["e"] = b64(h.pread(13, (1 << 20) - 6))
h.shutdown()
''', s.uri("disk"))
        want = bytearray(b"\x11" * 65536)
        want[1:4096] = b"\xab" * 4095
        assert unb64(r["a"]) == want[:8192]
        piece = bytes(range(256)) * 2 + b"\xfe"
        want[4000:4513] = piece
        assert unb64(r["b"]) == want
        assert unb64(r["c"]) == piece
        assert unb64(r["d"]) == want[4095:4098]
        assert unb64(r["e"]) == bytes(3) + b"\x5e" * 7 + bytes(3)


def test_fua_write_is_on_the_target_file(tmp_path):
    target = tmp_path / "lun.img"
    with open(target, "wb") as f:
        f.truncate(256 * MiB)
    with NbdProcess(tmp_path, exports=["d=direct"], target=target) as s:
        script = r'''
h = connect(sys.argv[1])
out["fua"] = bool(h.can_fua())
out["size"] = h.get_size()
h.pwrite(b"\xc3" * 12288, 5 << 20, flags=nbd.CMD_FLAG_FUA)
h.pwrite(b"\x3c" * 100, (5 << 20) + 50, flags=nbd.CMD_FLAG_FUA)
out["back"] = b64(h.pread(12288, 5 << 20))
pause()
h.shutdown()
'''
        want = bytearray(b"\xc3" * 12288)
        want[50:150] = b"\x3c" * 100
        with libnbd_paused(s, script, s.uri("d")) as r:
            # Read while the client is still connected: the FUA writes were
            # answered, so they are on the target, not in the server.
            fd = os.open(target, os.O_RDONLY)
            try:
                assert os.pread(fd, 12288, 5 * MiB) == want
            finally:
                os.close(fd)
        assert r["fua"] is True
        assert r["size"] == 256 * MiB, "a direct export is the whole LUN"
        assert unb64(r["back"]) == want


def test_flush_on_one_connection_covers_writes_of_another(tmp_path):
    target = tmp_path / "lun.img"
    with open(target, "wb") as f:
        f.truncate(256 * MiB)
    with NbdProcess(tmp_path, exports=["d=direct"], target=target) as s:
        script = r'''
a = connect(sys.argv[1])
b = connect(sys.argv[1])
out["multi_conn"] = bool(a.can_multi_conn()) and bool(b.can_multi_conn())
data = bytes((i * 7 + 3) & 0xff for i in range(1 << 20))
a.pwrite(data, 100 << 20)
a.pwrite(b"\x5a" * 4097, (200 << 20) + 1)
b.flush()
out["b_sees"] = b.pread(1 << 20, 100 << 20) == data
pause()
a.shutdown(); b.shutdown()
'''
        with libnbd_paused(s, script, s.uri("d")) as r:
            fd = os.open(target, os.O_RDONLY)
            try:
                data = bytes((i * 7 + 3) & 0xff for i in range(MiB))
                assert os.pread(fd, MiB, 100 * MiB) == data
                assert os.pread(fd, 4099, 200 * MiB) == b"\0" + b"\x5a" * 4097 + b"\0"
            finally:
                os.close(fd)
        assert r["multi_conn"] is True
        assert r["b_sees"] is True


# -- TRIM, WRITE_ZEROES, BLOCK_STATUS ---------------------------------------

def test_trim_zero_and_block_status_after_each(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1])
M = 1 << 20
K = 1 << 10
st = {}
st["new"] = status(h, 0, 4 * M)
data = os.urandom(4 * M)
h.pwrite(data, 0)
st["written"] = status(h, 0, 4 * M)
h.trim(256 * K, 256 * K)
st["trim"] = status(h, 0, 4 * M)
out["trim_read"] = h.pread(256 * K, 256 * K) == bytes(256 * K)
h.zero(1 * M, 1 * M)                              # [1M, 2M)
st["zero"] = status(h, 0, 4 * M)
out["zero_read"] = h.pread(1 * M, 1 * M) == bytes(1 * M)
h.zero(1 * M, 2 * M, flags=nbd.CMD_FLAG_NO_HOLE)  # [2M, 3M)
st["no_hole"] = status(h, 0, 4 * M)
out["no_hole_read"] = h.pread(1 * M, 2 * M) == bytes(1 * M)
out["rest"] = h.pread(256 * K, 0) == data[:256 * K] and \
    h.pread(1 * M, 3 * M) == data[3 * M:] and \
    h.pread(512 * K, 512 * K) == data[512 * K:M]
# REQ_ONE: one extent, starting at the offset asked
one = []
h.block_status(4 * M, 256 * K, lambda c, o, e, err: one.append(list(e)) or 0,
               flags=nbd.CMD_FLAG_REQ_ONE)
out["req_one"] = one
out["st"] = st
h.shutdown()
''', s.uri("disk"))
        st = r["st"]
        M, K = MiB, KiB
        assert st["new"] == [[0, 4 * M, HOLE_ZERO]]
        assert st["written"] == [[0, 4 * M, DATA]]
        assert st["trim"] == [[0, 256 * K, DATA], [256 * K, 512 * K, HOLE_ZERO],
                              [512 * K, 4 * M, DATA]]
        assert r["trim_read"] is True
        # WRITE_ZEROES without NO_HOLE punches a hole
        assert st["zero"] == [[0, 256 * K, DATA], [256 * K, 512 * K, HOLE_ZERO],
                              [512 * K, M, DATA], [M, 2 * M, HOLE_ZERO],
                              [2 * M, 4 * M, DATA]]
        assert r["zero_read"] is True
        # with NO_HOLE the zeros are written: allocated (not HOLE), reads zero
        nh = st["no_hole"]
        assert nh[:4] == [[0, 256 * K, DATA], [256 * K, 512 * K, HOLE_ZERO],
                          [512 * K, M, DATA], [M, 2 * M, HOLE_ZERO]], nh
        for start, end, flags in nh[4:]:
            assert not flags & 1, f"NO_HOLE zeroing left a hole at {start}..{end}: {nh}"
        assert nh[-1][1] == 4 * M
        assert r["no_hole_read"] is True
        assert r["rest"] is True, "trim/zero changed data outside their ranges"
        (one,) = r["req_one"]
        assert len(one) == 2 and one[1] == HOLE_ZERO and 0 < one[0] <= 256 * K, one


def test_fast_zero(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1])
out["can"] = bool(h.can_fast_zero())
h.pwrite(b"\x6d" * (1 << 20), 0)
out["no_hole"] = errnum(h.zero, 65536, 0, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
out["kept"] = h.pread(65536, 0) == b"\x6d" * 65536
out["punch"] = errnum(h.zero, 65536, 65536, flags=nbd.CMD_FLAG_FAST_ZERO)
out["zeroed"] = h.pread(65536, 65536) == bytes(65536)
out["st"] = status(h, 0, 1 << 20)
out["after"] = h.pread(4096, 0) == b"\x6d" * 4096
h.shutdown()
''', s.uri("disk"))
        assert r["can"] is True
        assert r["no_hole"] is not None and r["no_hole"][0] == errno.ENOTSUP, r["no_hole"]
        assert r["kept"] is True, "a refused FAST_ZERO changed the data"
        # On a memory LUN punching is fast: FAST_ZERO without NO_HOLE succeeds.
        assert r["punch"] is None, r["punch"]
        assert r["zeroed"] is True
        assert r["st"] == [[0, 65536, DATA], [65536, 131072, HOLE_ZERO], [131072, MiB, DATA]]
        assert r["after"] is True


# -- many requests in flight -----------------------------------------------

def test_64_requests_in_flight(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        r = libnbd(s, r'''
h = connect(sys.argv[1])
N = 64
SZ = 65536 + 512          # not a multiple of 4096: neighbours share blocks
bufs = []
for i in range(N):
    bufs.append(nbd.Buffer.from_bytearray(bytes([i + 1]) * SZ))
errors = []
def done(i):
    def cb(err):
        if err.value:
            errors.append([i, err.value])
        return 1
    return cb
cookies = [h.aio_pwrite(bufs[i], i * SZ, completion=done(i)) for i in range(N)]
out["in_flight_w"] = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
rbufs = [nbd.Buffer(SZ) for _ in range(N)]
order = list(range(N))[::-1]
for i in order:
    h.aio_pread(rbufs[i], i * SZ, completion=done(i))
out["in_flight_r"] = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
out["errors"] = errors
out["bad"] = [i for i in range(N) if rbufs[i].to_bytearray() != bytes([i + 1]) * SZ]
# mixed: rewrite the even ones while reading the odd ones
for i in range(N):
    if i % 2 == 0:
        bufs[i] = nbd.Buffer.from_bytearray(bytes([0x80 + i]) * SZ)
        h.aio_pwrite(bufs[i], i * SZ, completion=done(i))
    else:
        rbufs[i] = nbd.Buffer(SZ)
        h.aio_pread(rbufs[i], i * SZ, completion=done(i))
out["in_flight_m"] = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
out["bad_mixed"] = [i for i in range(1, N, 2) if rbufs[i].to_bytearray() != bytes([i + 1]) * SZ]
whole = h.pread(N * SZ, 0)
out["bad_final"] = [i for i in range(N) if whole[i * SZ:(i + 1) * SZ] !=
                    bytes([(0x80 + i) if i % 2 == 0 else i + 1]) * SZ]
out["errors_all"] = errors
h.shutdown()
''', s.uri("disk"))
        assert r["in_flight_w"] > 32 and r["in_flight_r"] > 32 and r["in_flight_m"] > 32, r
        assert r["errors_all"] == []
        assert r["bad"] == []
        assert r["bad_mixed"] == []
        assert r["bad_final"] == []


# -- cost of a read --------------------------------------------------------

def test_structured_read_cost_does_not_depend_on_the_offset(tmp_path):
    """A 256 KiB structured read at the start of a fully written 1 GiB
    memory export costs about what one at its end costs: finding the holes
    of a read looks at the read's range, not at everything after it
    (SEEK_HOLE on a memfd walks the pages up to the next hole)."""
    with NbdProcess(tmp_path, exports=["disk=1G"]) as s:
        r = libnbd(s, r'''
import time
h = connect(sys.argv[1])
size = h.get_size()
piece = os.urandom(32 << 20)
for off in range(0, size, len(piece)):
    h.pwrite(piece, off)
def median_ms(off, n=31):
    ts = []
    for i in range(n):
        t = time.perf_counter()
        h.pread(256 << 10, off)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1000
out["start"] = median_ms(0)
out["end"] = median_ms(size - (1 << 20))
out["start_again"] = median_ms(0)
h.shutdown()
''', s.uri("disk"))
        start = min(r["start"], r["start_again"])
        assert start < 3 * r["end"] + 1.0, (
            f"256 KiB read at offset 0: {start:.2f} ms; at the last MiB: {r['end']:.2f} ms")


# -- read-modify-write against whole-block requests --------------------------

def test_unaligned_writes_do_not_undo_concurrent_whole_block_writes(tmp_path):
    """Three processes keep writing a few bytes into blocks 0..3 (the
    server read-modify-writes those blocks) while a fourth writes the whole
    blocks (pwrite of a new value, or zero()) and reads each block back
    right after its write is answered.  Bytes no small write touches must
    hold that value: a read-modify-write must not put back a copy of the
    block read before the whole-block write was answered."""
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        r = libnbd(s, r'''
import time
uri = sys.argv[1]
N, BLOCKS = 2000, 4
SMALL = ((0, 100, 0xAA), (200, 300, 0xBB), (3000, 3001, 0xCC))
def rest(d):
    return d[100:200] + d[300:3000] + d[3001:]
go_r, go_w = os.pipe()
stop_r, stop_w = os.pipe()
pids = []
for lo, hi, tag in SMALL:
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(stop_w)
            h = nbd.NBD()
            h.connect_uri(uri)
            data = bytes([tag]) * (hi - lo)
            os.read(go_r, 1)
            os.set_blocking(stop_r, False)
            while True:
                for b in range(BLOCKS):
                    h.pwrite(data, b * 4096 + lo)
                try:
                    if os.read(stop_r, 1) == b"":
                        break
                except BlockingIOError:
                    pass
            h.shutdown()
            os._exit(0)
        except BaseException:
            os._exit(1)
    pids.append(pid)
os.close(stop_r)
h = connect(uri)
os.write(go_w, b"xyz")
bad = {"write": 0, "zero": 0}
first = None
t0 = time.monotonic()
for v in range(1, N + 1):
    for b in range(BLOCKS):
        if v % 2:
            h.pwrite(bytes([v & 0xff]) * 4096, b * 4096)
            want, kind = v & 0xff, "write"
        else:
            h.zero(4096, b * 4096)
            want, kind = 0, "zero"
        got = rest(h.pread(4096, b * 4096))
        if got != bytes([want]) * len(got):
            bad[kind] += 1
            if first is None:
                first = [v, b, kind, sorted(set(got))]
os.close(stop_w)
out["children"] = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
out["bad"] = bad
out["first"] = first
out["seconds"] = time.monotonic() - t0
h.shutdown()
''', s.uri("disk"))
        assert r["children"] == [0, 0, 0], r
        assert r["bad"] == {"write": 0, "zero": 0}, (
            f"of {2000 * 4} whole-block requests, these read back something else: {r['bad']}; "
            f"first (value, block, kind, bytes seen): {r['first']}")


def test_block_status_sees_trims_and_writes_of_another_connection(tmp_path):
    """Block status on connection A after B trims or writes: every one of
    A's workers answers from the store as it is now (the server remembers
    data runs per worker; a remembered run must not hide B's hole, and
    nothing may hide B's data)."""
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        r = libnbd(s, r'''
M = 1 << 20
a = connect(sys.argv[1])
b = connect(sys.argv[1])
a.pwrite(os.urandom(8 * M), 0)
res = {}
res["before"] = [status(a, 0, 8 * M) for _ in range(48)]   # every worker of A
b.trim(1 * M, 2 * M)                        # [2M, 3M)
res["after_trim"] = [status(a, 0, 8 * M) for _ in range(48)]
b.pwrite(b"\x01" * 4096, 2 * M + 8192)
res["after_write"] = [status(a, 0, 8 * M) for _ in range(48)]
b.zero(1 * M, 5 * M)                        # [5M, 6M)
res["after_zero"] = [status(a, 0, 8 * M) for _ in range(48)]
out["res"] = {k: sorted(set(json.dumps(x) for x in v)) for k, v in res.items()}
a.shutdown(); b.shutdown()
''', s.uri("disk"))
        M = MiB
        want = {
            "before": [[0, 8 * M, DATA]],
            "after_trim": [[0, 2 * M, DATA], [2 * M, 3 * M, HOLE_ZERO], [3 * M, 8 * M, DATA]],
            "after_write": [[0, 2 * M, DATA], [2 * M, 2 * M + 8192, HOLE_ZERO],
                            [2 * M + 8192, 2 * M + 12288, DATA],
                            [2 * M + 12288, 3 * M, HOLE_ZERO], [3 * M, 8 * M, DATA]],
            "after_zero": [[0, 2 * M, DATA], [2 * M, 2 * M + 8192, HOLE_ZERO],
                           [2 * M + 8192, 2 * M + 12288, DATA],
                           [2 * M + 12288, 3 * M, HOLE_ZERO], [3 * M, 5 * M, DATA],
                           [5 * M, 6 * M, HOLE_ZERO], [6 * M, 8 * M, DATA]],
        }
        for k, v in want.items():
            assert r["res"][k] == [json.dumps(v)], (k, r["res"][k])


# -- resizing an export under a connected client ---------------------------

class _InProcess:
    """What libnbd()/libnbd_paused() need of a server: its log."""

    def __init__(self):
        self.lines = []

    def log(self):
        return "\n".join(self.lines)


def test_resize_while_a_client_is_connected(tmp_path):
    """NbdServer.resize_export grows an export for clients that connect
    afterwards (nbdinfo, a new libnbd handle); a connected client keeps the
    size it was told, and shrinking below that is EBUSY until it goes."""
    import cxlflash
    from cxlflash.server.nbd import NbdServer
    log = _InProcess()
    adapter = cxlflash.Adapter()
    adapter.add_lun(None, size=1 << 30)
    srv = NbdServer(adapter, log=log.lines.append)
    try:
        srv.add_export("disk", 64 * MiB)
        sock = srv.listen_unix(str(tmp_path / "nbd.sock"))
        srv.start()
        uri = f"nbd+unix:///disk?socket={sock}"

        def nbdinfo_size():
            p = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                               timeout=60)
            assert p.returncode == 0, (p.stderr, log.log())
            return int(p.stdout)

        script = r'''
old = connect(sys.argv[1], strict=False)
out["told"] = old.get_size()
old.pwrite(b"\x5b" * 4096, (64 << 20) - 4096)
pause()
out["still_told"] = old.get_size()
out["old_past"] = errnum(old.pread, 4096, 64 << 20)
new = connect(sys.argv[1])
out["new_size"] = new.get_size()
new.pwrite(b"\x6c" * 4096, 100 << 20)
out["new_read"] = new.pread(4096, 100 << 20) == b"\x6c" * 4096
out["kept"] = new.pread(4096, (64 << 20) - 4096) == b"\x5b" * 4096
new.shutdown(); old.shutdown()
'''
        paused = libnbd_paused(log, script, uri)
        with paused as first:
            assert first["told"] == 64 * MiB
            srv.resize_export("disk", 128 * MiB)
            assert srv.exports["disk"].size == 128 * MiB
            assert nbdinfo_size() == 128 * MiB
            try:
                srv.resize_export("disk", 32 * MiB)
            except OSError as e:
                assert e.errno == errno.EBUSY, e
                assert "disconnect" in str(e), e
            else:
                raise AssertionError("shrinking below a connected client's size succeeded")
            assert srv.exports["disk"].size == 128 * MiB
        r = paused.final
        assert r["still_told"] == 64 * MiB, "NBD cannot tell a connected client of a resize"
        # Past the size it was told: EINVAL, although the export is larger now.
        assert r["old_past"] is not None and r["old_past"][0] == errno.EINVAL, r
        assert r["new_size"] == 128 * MiB
        assert r["new_read"] is True and r["kept"] is True
        # Everyone gone: it may shrink now.
        deadline = time.monotonic() + 10
        while True:
            try:
                srv.resize_export("disk", 32 * MiB)
                break
            except OSError as e:
                # The server may not have noticed the disconnects yet.
                assert e.errno == errno.EBUSY and time.monotonic() < deadline, e
                time.sleep(0.05)
        assert nbdinfo_size() == 32 * MiB
    finally:
        srv.close()
        adapter.close()
