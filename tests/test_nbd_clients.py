"""The NBD export (issue 11) used by real clients, as a user uses them.

Each test starts ``cxlflash nbd`` (``nbd_servers.NbdProcess``) and drives it
with Debian's tools: ``nbdinfo`` (flags, block sizes, ``--list``,
``--map``), ``nbdcopy`` (1 GiB of random data in and out, one and four
connections; a sparse file stays sparse), ``qemu-img`` (``info``,
``convert`` both ways, ``map``), ``qemu-io`` (pattern writes and verified
reads) and ``fio --ioengine=nbd`` (random writes verified with crc32c,
then random reads), over a Unix socket and over TCP.  ``.ci/run`` installs
the tools; none of these tests is skipped.
"""
import hashlib
import json
import os
import socket
import subprocess
import time

import numpy as np

from nbd_servers import NbdProcess

MiB = 1 << 20
GiB = 1 << 30
PIECE = 4 * MiB


# -- helpers ---------------------------------------------------------------

def run(server, args, timeout=120, check=True, cwd=None):
    """Runs a client; asserts it exited 0 (quoting its output and the
    server's log) unless ``check`` is false.  Returns the CompletedProcess."""
    p = subprocess.run([str(a) for a in args], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check:
        assert p.returncode == 0, (
            f"{' '.join(map(str, args))} exited {p.returncode}\n"
            f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}\nserver log:\n{server.log()}")
    return p


def nbdinfo_json(server, uri, *extra):
    return json.loads(run(server, ["nbdinfo", "--json", *extra, uri]).stdout)


def merged_map(entries, start_key, type_of):
    """[(start, end, type)] with neighbours of one type merged, whichever
    way the server split its extents."""
    out = []
    for e in sorted(entries, key=lambda e: e[start_key]):
        s, n, t = e[start_key], e["length"], type_of(e)
        if out and out[-1][2] == t and out[-1][1] == s:
            out[-1] = (out[-1][0], s + n, t)
        else:
            assert not out or out[-1][1] == s, f"map has a gap or overlap at {s}: {entries}"
            out.append((s, s + n, t))
    return out


def nbdinfo_map(server, uri):
    """``nbdinfo --map --json``, merged: [(start, end, "data"|"hole,zero")]."""
    entries = nbdinfo_json(server, uri, "--map")
    return merged_map(entries, "offset", lambda e: e["description"])


def qemu_img_map(server, uri):
    """``qemu-img map --output=json``, merged: [(start, end, (data, zero))]."""
    entries = json.loads(run(server, ["qemu-img", "map", "--output=json", uri]).stdout)
    return merged_map(entries, "start", lambda e: (e["data"], e["zero"]))


def write_file(path, size, layout):
    """A file of ``size`` bytes, sparse where ``layout`` says nothing:
    ``layout`` is [(start, end, kind)], kind "random" (os.urandom in 4 MiB
    pieces) or "zeros" (zero bytes written, so allocated).  Returns the
    sha256 of the whole content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for start, end, kind in layout:
            f.seek(start)
            pos = start
            while pos < end:
                n = min(PIECE, end - pos)
                f.write(os.urandom(n) if kind == "random" else bytes(n))
                pos += n
    return sha256_of(path)


def sha256_of(path, start=0, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = os.fstat(f.fileno()).st_size - start if length is None else length
        while left > 0:
            b = f.read(min(PIECE, left))
            assert b, f"{path} ends before {start + length}"
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def random_bytes(rng, n):
    """n random bytes (numpy's generator: 1 GiB in under a second, where
    os.urandom takes ~5 s on the CI machine)."""
    return rng.integers(0, 1 << 64, size=(n + 7) // 8, dtype=np.uint64).tobytes()[:n]


def random_data_file(path, size):
    """A random file made in 4 MiB pieces; returns its sha256 (hashed as
    it is made)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = random_bytes(rng, min(PIECE, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    return h.hexdigest()


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_io(server, uri, *commands, check=True):
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return run(server, args + [uri], check=check)


def assert_verified(p, *expect):
    out = p.stdout + p.stderr
    assert "Pattern verification failed" not in out, out
    for e in expect:
        assert e in out, f"{e!r} not in qemu-io's output:\n{out}"


# -- nbdinfo ---------------------------------------------------------------

def test_nbdinfo_size_flags_and_block_sizes(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=64M", "other=8M"]) as s:
        info = nbdinfo_json(s, s.uri("disk"))
        assert info["protocol"] == "newstyle-fixed"
        assert info["structured"] is True
        (e,) = info["exports"]
        assert e["export-name"] == "disk"
        assert e["export-size"] == 64 * MiB
        for flag in ("can_multi_conn", "can_trim", "can_zero", "can_fast_zero",
                     "can_fua", "can_flush", "can_cache", "can_df"):
            assert e[flag] is True, (flag, e)
        assert e["is_read_only"] is False
        assert e["block_size_minimum"] == 1
        assert e["block_size_preferred"] == 4096
        assert e["block_size_maximum"] == 32 * MiB
        assert "base:allocation" in e["contexts"]
        # The human form and --size say the same.
        text = run(s, ["nbdinfo", s.uri("other")]).stdout
        assert "export-size: 8388608 (8M)" in text, text
        assert "can_multi_conn: true" in text, text
        assert run(s, ["nbdinfo", "--size", s.uri("disk")]).stdout.strip() == str(64 * MiB)
        # nbdinfo --can/--is, as scripts ask: exit 0 true, 2 false.
        for q in ("can multi-conn", "can trim", "can zero", "can fast-zero", "can fua",
                  "can flush", "can cache", "can df", "can structured-reply", "can connect",
                  "is read-only"):
            p = run(s, ["nbdinfo", *f"--{q}".split(), s.uri("disk")], check=False)
            assert p.returncode == (2 if q == "is read-only" else 0), (q, p)


def test_nbdinfo_list_shows_every_export(tmp_path):
    sizes = {"alpha": 16 * MiB, "beta": 32 * MiB, "gamma": 1 * GiB, "d-4": 4096}
    with NbdProcess(tmp_path, exports=[f"{n}={v}" for n, v in sizes.items()]) as s:
        info = nbdinfo_json(s, s.uri(""), "--list")
        listed = {e["export-name"]: e["export-size"] for e in info["exports"]}
        assert listed == sizes, info
        text = run(s, ["nbdinfo", "--list", s.uri("")]).stdout
        for name in sizes:
            assert f'export="{name}"' in text, text
        # The empty name selects the first export.
        (e,) = nbdinfo_json(s, s.uri(""))["exports"]
        assert e["export-size"] == sizes["alpha"], e


def test_nbdinfo_map_shows_data_and_holes(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        uri = s.uri("disk")
        assert nbdinfo_map(s, uri) == [(0, 64 * MiB, "hole,zero")], \
            "a new export on a memory LUN is all hole"
        qemu_io(s, uri, "write -P 0x5c 0 4M", "write -P 0x11 32M 1M")
        assert nbdinfo_map(s, uri) == [
            (0, 4 * MiB, "data"), (4 * MiB, 32 * MiB, "hole,zero"),
            (32 * MiB, 33 * MiB, "data"), (33 * MiB, 64 * MiB, "hole,zero")]
        # Trim 1M..2M (qemu-io discard is NBD_CMD_TRIM) and zero 3M..4M
        # allowing holes (write -z -u: WRITE_ZEROES without NO_HOLE).
        p = qemu_io(s, uri, "discard 1M 1M", "write -z -u 3M 1M",
                    "read -P 0 1M 1M", "read -P 0 3M 1M", "read -P 0x5c 0 1M",
                    "read -P 0x5c 2M 1M")
        assert_verified(p, "discard 1048576/1048576 bytes at offset 1048576")
        want = [(0, MiB, "data"), (MiB, 2 * MiB, "hole,zero"), (2 * MiB, 3 * MiB, "data"),
                (3 * MiB, 32 * MiB, "hole,zero"), (32 * MiB, 33 * MiB, "data"),
                (33 * MiB, 64 * MiB, "hole,zero")]
        assert nbdinfo_map(s, uri) == want
        # The text form says the same.
        text = run(s, ["nbdinfo", "--map", uri]).stdout
        lines = [l.split() for l in text.splitlines() if l.strip()]
        got = merged_map([{"offset": int(l[0]), "length": int(l[1]), "d": l[3]} for l in lines],
                         "offset", lambda e: e["d"])
        assert got == want, text


# -- nbdcopy ---------------------------------------------------------------

def test_nbdcopy_1g_in_and_out_one_and_four_connections(tmp_path):
    src = tmp_path / "src.img"
    digest = random_data_file(src, GiB)
    with NbdProcess(tmp_path, exports=["one=1G", "four=1G"]) as s:
        times = {}
        for name, conns in (("one", 1), ("four", 4)):
            out = tmp_path / f"out-{name}.img"
            t0 = time.monotonic()
            run(s, ["nbdcopy", "--connections", conns, src, s.uri(name)])
            t1 = time.monotonic()
            run(s, ["nbdcopy", "--connections", conns, s.uri(name), out])
            t2 = time.monotonic()
            times[name] = (t1 - t0, t2 - t1)
            assert os.path.getsize(out) == GiB
            assert sha256_of(out) == digest, f"{name}: what came out is not what went in"
            out.unlink()
        print("nbdcopy 1 GiB in/out seconds:", times)
        # Both exports hold data now: nothing of it is reported as a hole.
        assert nbdinfo_map(s, s.uri("four")) == [(0, GiB, "data")]


def test_nbdcopy_sparse_source_leaves_holes(tmp_path):
    size = 64 * MiB
    full = tmp_path / "full.img"
    random_data_file(full, size)
    sparse = tmp_path / "sparse.img"
    layout = [(0, 4 * MiB, "random"), (20 * MiB, 24 * MiB, "random"),
              (60 * MiB, 64 * MiB, "random")]
    digest = write_file(sparse, size, layout)
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        uri = s.uri("disk")
        # First all data, so the holes afterwards are nbdcopy's doing.
        run(s, ["nbdcopy", full, uri])
        assert nbdinfo_map(s, uri) == [(0, size, "data")]
        run(s, ["nbdcopy", sparse, uri])
        assert nbdinfo_map(s, uri) == [
            (0, 4 * MiB, "data"), (4 * MiB, 20 * MiB, "hole,zero"),
            (20 * MiB, 24 * MiB, "data"), (24 * MiB, 60 * MiB, "hole,zero"),
            (60 * MiB, 64 * MiB, "data")]
        out = tmp_path / "out.img"
        run(s, ["nbdcopy", uri, out])
        assert sha256_of(out) == digest


def test_nbdcopy_sparse_into_a_file_target_keeps_the_file_sparse(tmp_path):
    """A direct export of a file: what nbdcopy leaves as holes are holes
    of the file itself (fallocate PUNCH_HOLE), and the file is the image."""
    size = 256 * MiB
    target = tmp_path / "lun.img"
    random_data_file(target, size)                  # fully allocated
    sparse = tmp_path / "sparse.img"
    digest = write_file(sparse, size, [(100 * MiB, 104 * MiB, "random"),
                                       (200 * MiB, 200 * MiB + 4096, "random")])
    with NbdProcess(tmp_path, exports=["d=direct"], target=target) as s:
        uri = s.uri("d")
        run(s, ["nbdcopy", sparse, uri])
        assert nbdinfo_map(s, uri) == [
            (0, 100 * MiB, "hole,zero"), (100 * MiB, 104 * MiB, "data"),
            (104 * MiB, 200 * MiB, "hole,zero"), (200 * MiB, 200 * MiB + 4096, "data"),
            (200 * MiB + 4096, size, "hole,zero")]
        allocated = os.stat(target).st_blocks * 512
        assert allocated <= 5 * MiB, f"the target file still has {allocated} bytes allocated"
        assert sha256_of(target) == digest


# -- qemu-img and qemu-io --------------------------------------------------

def test_qemu_img_info_convert_both_ways_and_map(tmp_path):
    size = 64 * MiB
    full = tmp_path / "full.img"
    random_data_file(full, size)
    img = tmp_path / "in.img"
    digest = write_file(img, size, [(0, 8 * MiB, "random"), (40 * MiB, 41 * MiB, "random"),
                                    (48 * MiB, 52 * MiB, "zeros")])
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        uri = s.uri("disk")
        info = json.loads(run(s, ["qemu-img", "info", "--output=json", uri]).stdout)
        assert info["virtual-size"] == size, info
        assert info["format"] == "raw", info
        # Into the export (-n: the target exists), over data already there.
        run(s, ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", full, uri])
        assert qemu_img_map(s, uri) == [(0, size, (True, False))]
        run(s, ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img, uri])
        # Out to a file: identical.
        out = tmp_path / "out.img"
        run(s, ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out])
        assert os.path.getsize(out) == size
        assert sha256_of(out) == digest
        # The map: data where the image had data, holes reading as zeros
        # elsewhere (the written zeros at 48M..52M are zeros too: qemu-img
        # turns them into zeroing requests that may punch holes).
        m = qemu_img_map(s, uri)
        assert m == [(0, 8 * MiB, (True, False)), (8 * MiB, 40 * MiB, (False, True)),
                     (40 * MiB, 41 * MiB, (True, False)), (41 * MiB, size, (False, True))], m
        # qemu-img compare agrees, and notices a one-byte change.
        p = run(s, ["qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri])
        assert "Images are identical" in p.stdout, p.stdout
        qemu_io(s, uri, "write -P 0x01 45M 1")
        p = run(s, ["qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri], check=False)
        assert p.returncode == 1 and f"Content mismatch at offset {45 * MiB}!" in p.stdout, p


def test_qemu_io_pattern_writes_and_verified_reads(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=16M"]) as s:
        uri = s.uri("disk")
        p = qemu_io(s, uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k")
        assert_verified(p, "wrote 65536/65536 bytes at offset 0",
                        "read 65536/65536 bytes at offset 0")
        # Unaligned, in the middle of that: the neighbours stay.
        p = qemu_io(s, uri, "write -P 0x5a 1000 3000", "read -P 0x5a 1000 3000",
                    "read -P 0xab 0 1000", "read -P 0xab 4000 61536",
                    "write -P 0x77 16773120 4096", "read -P 0x77 16773120 4096",
                    "read -P 0 65536 1M")
        assert_verified(p, "wrote 3000/3000 bytes at offset 1000",
                        "read 61536/61536 bytes at offset 4000")
        # A new connection sees the same; and a wrong pattern is noticed
        # (qemu-io verifies for real).
        p = qemu_io(s, uri, "read -P 0x5a 1000 3000", "read -P 0x77 16773120 4096")
        assert_verified(p)
        p = qemu_io(s, uri, "read -P 0xab 0 64k", check=False)
        assert "Pattern verification failed" in p.stdout + p.stderr, p.stdout + p.stderr


# -- fio -------------------------------------------------------------------

def fio_json(server, uri, *args):
    # In the server's directory: fio leaves its verify state file there.
    p = run(server, ["fio", "--output-format=json", "--name=nbd", "--ioengine=nbd",
                     f"--uri={uri}", "--bs=4k", "--iodepth=16", "--size=64M",
                     "--randseed=1234", *args], timeout=300,
            cwd=os.path.dirname(server.socket))
    out = p.stdout
    doc = json.loads(out[out.index("{"):])
    (job,) = doc["jobs"]
    assert job["error"] == 0, (job["error"], p.stderr, server.log())
    return job


def test_fio_randwrite_verify_then_randread(tmp_path):
    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        uri = s.uri("disk")
        job = fio_json(s, uri, "--rw=randwrite", "--verify=crc32c")
        assert job["write"]["io_bytes"] == 64 * MiB, job["write"]
        # The verify phase read every block back and checked its crc32c.
        assert job["read"]["io_bytes"] == 64 * MiB, job["read"]
        # A new connection verifies what the first one wrote.
        job = fio_json(s, uri, "--rw=randwrite", "--verify=crc32c", "--verify_only")
        assert job["read"]["io_bytes"] == 64 * MiB, job["read"]
        # And a plain random read pass at depth 16.
        job = fio_json(s, uri, "--rw=randread")
        assert job["read"]["io_bytes"] == 64 * MiB, job["read"]
        assert job["read"]["total_ios"] == 64 * MiB // 4096, job["read"]
        assert nbdinfo_map(s, uri) == [(0, 64 * MiB, "data")]
        # Four connections at once (one per job, 16 MiB each), sizes from
        # 512 bytes to 128 KiB (partial blocks too), a FLUSH every 32 writes.
        job = fio_json(s, uri, "--rw=randwrite", "--verify=crc32c", "--numjobs=4",
                       "--size=16M", "--offset_increment=16M", "--bsrange=512-128k",
                       "--fsync=32", "--group_reporting")
        assert job["write"]["io_bytes"] == 64 * MiB, job["write"]
        assert job["read"]["io_bytes"] == 64 * MiB, job["read"]
        assert job["sync"]["total_ios"] > 0, job["sync"]


# -- TCP -------------------------------------------------------------------

def test_tcp_nbdinfo_and_qemu_io(tmp_path):
    port = free_tcp_port()
    with NbdProcess(tmp_path, exports=["disk=32M", "two=8M"], tcp=f"127.0.0.1:{port}") as s:
        uri = s.tcp_uri("disk")
        assert uri == f"nbd://127.0.0.1:{port}/disk"
        (e,) = nbdinfo_json(s, uri)["exports"]
        assert e["export-size"] == 32 * MiB
        assert e["can_multi_conn"] is True
        listed = {x["export-name"] for x in nbdinfo_json(s, s.tcp_uri(""), "--list")["exports"]}
        assert listed == {"disk", "two"}
        p = qemu_io(s, uri, "write -P 0x3c 4096 128k", "read -P 0x3c 4096 128k",
                    "read -P 0 0 4096")
        assert_verified(p, "wrote 131072/131072 bytes at offset 4096")
        # The same export through the Unix socket.
        assert_verified(qemu_io(s, s.uri("disk"), "read -P 0x3c 4096 128k"))
        assert_verified(qemu_io(s, s.tcp_uri("two"), "read -P 0 0 8M"))


# -- the daemon's exports --------------------------------------------------

def test_daemon_exports_beside_an_api_clients_vlun(tmp_path):
    """``cxlflash serve --nbd unix:PATH --export``: the export is a vLUN of
    the daemon's LUN, next to a vLUN of an API client; each keeps its data."""
    import daemon_process
    sock = tmp_path / "nbd.sock"
    with daemon_process.start(tmp_path, "--size", "1G", "--nbd", f"unix:{sock}",
                              "--export", "disk=64M", "--export", "small=1M") as d:
        uri = f"nbd+unix:///disk?socket={sock}"
        (e,) = nbdinfo_json(d, uri)["exports"]
        assert e["export-size"] == 64 * MiB and e["can_multi_conn"] is True, e
        listed = {x["export-name"]: x["export-size"]
                  for x in nbdinfo_json(d, f"nbd+unix:///?socket={sock}", "--list")["exports"]}
        assert listed == {"disk": 64 * MiB, "small": MiB}
        with d.connect() as a, a.open_disk(a.luns()[0]) as disk, \
                disk.attach(os.O_RDWR) as ctx, ctx.create_virtual(size=2 * 65536) as vlun:
            mine = bytes([0xa7]) * (16 * 4096)
            vlun.write(0, mine)
            vlun.write(65536, mine)       # its second chunk
            p = qemu_io(d, uri, "write -P 0x3e 0 64M", "read -P 0x3e 0 64M")
            assert_verified(p, "wrote 67108864/67108864 bytes at offset 0")
            assert_verified(qemu_io(d, f"nbd+unix:///small?socket={sock}", "read -P 0 0 1M"))
            assert vlun.read(0, 16) == mine and vlun.read(65536, 16) == mine
