"""Setting up what a run measures: an adapter with one LUN on memory, a
file or a block device (the rules for an existing path: never written
without --force), an open context on it, and the LUN the I/O runs on."""
import fcntl
import os
import stat
import struct
import time

from ..adapter import Adapter
from ..backing import (BLKGETSIZE64, BLKSSZGET, Backing, BlockDeviceBacking, FileBacking,
                       aligned_buffer, is_rbd)
from ..errors import CxlFlashError
from .._core.tables import MC_CHUNK_SIZE
from .iorun import region_blocks
from .options import BenchError
from .results import RunLog
from .units import mib


def probe(path):
    """(kind, size in bytes) of what is at ``path``: kind is None when
    nothing is there, "file", "block device" or "other"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, 0
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, struct.pack("Q", 0))
        finally:
            os.close(fd)
        return "block device", struct.unpack("Q", buf)[0]
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    return "other", 0


def writes_target(opts):
    """Does this run write to its target?  Every workload but a read-only
    ``io`` run writes (the matrix has write rows; arkdb and the resize storm
    write as they grow)."""
    return not (opts.workload == "io" and opts.read_pct >= 100)


def overwritten(opts, size, block_size=4096):
    """Exactly what a run writing to an existing target of ``size`` bytes
    overwrites, in words."""
    if opts.workload in ("arkdb", "resize-storm"):
        return (f"any of its {mib(size)} (bytes 0..{size - 1}): {opts.workload} grows and "
                "shrinks many virtual LUNs across the whole LUN")
    region = opts.vlun_blocks * 4096
    if opts.lun == "direct":
        n = min(size, region)
        what = "the direct LUN's first --vlun-size bytes"
    else:
        # A fresh adapter hands a new vLUN the LUN's first chunks, in order
        # (tests/test_cli.py checks it): its blocks are the LUN's first bytes.
        n = min(size, region)
        what = "the virtual LUN's blocks, the LUN's first chunks"
    return (f"bytes 0..{n - 1} (the first {mib(n)}: {what}, prefilled, then written "
            "by the workload)")


class _ReadOnlyFile(FileBacking):
    """An existing file opened O_RDONLY: a read-only run cannot write it."""

    def __init__(self, path, direct=False):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        Backing.__init__(self, fd, 4096, path=path, direct=direct)


class _ReadOnlyDevice(BlockDeviceBacking):
    """An existing block device opened O_RDONLY."""

    def __init__(self, path, direct=False):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        try:
            buf = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
        except BaseException:
            os.close(fd)
            raise
        Backing.__init__(self, fd, max(512, struct.unpack("i", buf)[0]), path=path,
                         direct=direct)


class _DaemonLun:
    """What a run needs of a daemon's LUN (the embedded run reads the
    driver's record): its WWID, last LBA and block size, from ATTACH."""

    def __init__(self, wwid, max_lba, blk_len):
        self.wwid = wwid
        self.max_lba = max_lba
        self.blk_len = blk_len


class Target:
    """An adapter with one LUN and an open context on it.

    The rules for a path (issue 13): a missing path is created (the run
    says so); an existing file or device that may hold data is never
    written without ``opts.force`` -- a read-only run opens it O_RDONLY and
    reads what is there without a prefill; an empty file, a device with
    nothing attached and anything else are refused with a message saying
    what is wrong."""

    def __init__(self, opts, log=None):
        self.opts = opts
        self.log = log or RunLog()
        self.read_only = False          # an existing target, read as it is
        self._backing = None
        t = opts.target
        if opts.connect:
            self._connect(opts)
            return
        if is_rbd(t):
            backing, size = None, self._check_rbd(t)
        elif t != "memory":
            backing, size = self._open_path(t)
        else:
            backing, size = None, opts.size
        self._backing = backing
        self.adapter = self._open_adapter()
        try:
            self.wwid = self._add_lun(t, backing, size)
        except OSError as e:
            self.close()
            raise BenchError(f"cannot use target {t!r}: {e.strerror or e}") from None
        self.glun = self.adapter.driver.gluns[self.wwid]
        self.disk = self.adapter.open_disk(self.wwid)
        self.ctx = self.disk.attach()

    def _connect(self, opts):
        """A client of the daemon at ``opts.connect``, on one of its LUNs:
        ``-t WWID`` (hex, as ``cxlflash ctl luns`` shows it), or with the
        default target the first LUN with room for the run's virtual LUN.
        The daemon's LUNs are shared: a run writes only into the chunks of
        its own virtual LUN; ``--lun direct`` writes the physical LUN itself,
        so a run that writes needs --force there."""
        from ..adapter import connect
        try:
            self.adapter = connect(opts.connect)
        except OSError as e:
            raise BenchError(f"--connect {opts.connect}: {e.strerror or e}") from None
        try:
            luns = self.adapter.status()["luns"]
            self.wwid = self._daemon_lun(opts, luns)
            self.disk = self.adapter.open_disk(self.wwid)
            self.ctx = self.disk.attach()
        except OSError as e:
            self.close()
            raise BenchError(f"--connect {opts.connect}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise
        self.glun = _DaemonLun(self.wwid, self.ctx.last_lba, self.ctx.block_size)
        self.log.say(f"a client of the daemon at {opts.connect} (pid "
                     f"{self.adapter.status()['pid']}), LUN {self.wwid.hex()}")

    def _daemon_lun(self, opts, luns):
        if not luns:
            raise BenchError(f"the daemon at {opts.connect} has no LUN")
        t = opts.target
        if t != "memory":
            try:
                want = bytes.fromhex(t)
            except ValueError:
                want = None
            if want is None or len(want) != 16:
                raise BenchError(f"with --connect, -t names one of the daemon's LUNs by "
                                 f"its WWID (32 hex digits, see 'cxlflash ctl luns'), not "
                                 f"{t!r}; a file or device is the daemon's to open: "
                                 f"'cxlflash serve --lun {t}'")
            if not any(lun["wwid"] == want.hex() for lun in luns):
                raise BenchError(f"the daemon at {opts.connect} has no LUN {want.hex()} "
                                 f"(it has {', '.join(lun['wwid'] for lun in luns)})")
            lun = next(lun for lun in luns if lun["wwid"] == want.hex())
        else:
            # A chunk is MC_CHUNK_SIZE blocks of the LUN, whatever its block size.
            need = 0 if opts.lun == "direct" else -(-opts.vlun_blocks // MC_CHUNK_SIZE)
            lun = next((lun for lun in luns if lun["chunks_free"] >= need), None)
            if lun is None:
                raise BenchError(
                    f"no LUN of the daemon at {opts.connect} has room for a "
                    f"{opts.vlun_blocks}-block virtual LUN ({need} chunks): "
                    + "; ".join(f"{x['wwid']}: {x['chunks_free']} of {x['chunks_total']} "
                                "chunks free" for x in luns)
                    + " (give a smaller --vlun-size, or -t WWID)")
        if opts.lun == "direct" and writes_target(opts) and not opts.force:
            raise BenchError(f"refusing to write the daemon's LUN {lun['wwid']} directly "
                             f"(--lun direct: its first {mib(opts.vlun_blocks * 4096)}, "
                             "which other clients' virtual LUNs may hold); give --force, "
                             "or use a virtual LUN (the default) or a read-only run")
        return bytes.fromhex(lun["wwid"])

    def _check_rbd(self, t):
        """An RBD image is used at its own size, and written only with
        --force (it may hold data); a read-only run reads what it holds."""
        o = self.opts
        if o.size_given:
            raise BenchError(f"--size is for memory or a new file: the RBD image {t} is "
                             "used at its own size (grow it with rbd resize)")
        if o.direct_io:
            raise BenchError("--direct-io is for files and devices, not an RBD image")
        if not writes_target(o):
            self.read_only = True
            self.log.say(f"{t}: reading what it holds, without a prefill")
        elif not o.force:
            raise BenchError(f"refusing to overwrite the RBD image {t} (it may hold data): "
                             "give --force (or --allow-overwrite) to overwrite it, or use a "
                             "read-only workload (cxlflash bench io -r 100)")
        return None

    def _open_path(self, t):
        """(a Backing this run opened read-only, or None; the size to give
        add_lun) for a path target, after the checks."""
        o = self.opts
        try:
            kind, size = probe(t)
        except OSError as e:
            raise BenchError(f"cannot use target {t!r}: {e.strerror or e}") from None
        if kind is None:
            if not o.size_given and o.size is None:
                raise BenchError(f"target {t} does not exist: give --size to create it")
            self.log.say(f"{t} does not exist: creating it, a sparse file of "
                         f"{mib(o.size)} (left in place after the run)")
            return None, o.size
        if kind == "other":
            raise BenchError(f"cannot use target {t!r}: it is neither a regular file "
                             "nor a block device")
        if size == 0:
            if kind == "block device":
                hint = (f" (attach a file first: losetup {t} FILE)"
                        if os.path.basename(t).startswith("loop") else "")
                raise BenchError(f"target {t} is a block device of 0 bytes: nothing is "
                                 f"attached to it{hint}")
            if not o.size_given:
                raise BenchError(f"target {t} is an empty file (0 bytes): nothing to read "
                                 "and no room to write; give --size to extend it into a "
                                 "LUN of that size, or use another target")
            self.log.say(f"{t} is an empty file: extending it to {mib(o.size)} (sparse)")
            return None, o.size
        if o.size_given:
            raise BenchError(f"--size is for memory or a new file: {t} exists "
                             f"({mib(size)}) and is used at its own size")
        if not writes_target(o):
            self.read_only = True
            self.log.say(f"{t} exists ({kind}, {mib(size)}): reading what it holds, "
                         "opened read-only, without a prefill")
            opener = _ReadOnlyDevice if kind == "block device" else _ReadOnlyFile
            try:
                return opener(t, direct=o.direct_io), None
            except OSError as e:
                raise BenchError(f"cannot use target {t!r}: {e.strerror or e}") from None
        what = overwritten(o, size)
        if not o.force:
            raise BenchError(f"refusing to overwrite {t} ({kind}, {mib(size)}, may hold "
                             f"data): this run would write {what}; give --force (or "
                             "--allow-overwrite) to overwrite it, use a read-only "
                             "workload (cxlflash bench io -r 100), or a new file or memory")
        self.log.say(f"overwriting {t} ({kind}, {mib(size)}) as --force allows: {what}")
        return None, None

    def _open_adapter(self):
        """The adapter the run measures: an embedded one (a run on a
        daemon's driver would connect here)."""
        return Adapter()

    def _add_lun(self, t, backing, size):
        """The target's LUN on the adapter: its WWID."""
        if t == "memory":
            return self.adapter.add_lun(None, size=size)
        if is_rbd(t):
            return self.adapter.add_lun(t)
        if backing is not None:
            return self.adapter.add_lun(backing)
        return self.adapter.add_lun(t, size=size, direct=self.opts.direct_io)

    @property
    def fd(self):
        """The backing store's fd in this process (the raw baseline's; for
        a client, the one the daemon passed for its replicas)."""
        if self.opts.connect:
            return self.adapter._channel()._backing(self.wwid).fd
        return self.glun.backing.fd

    def open_lun(self, blocks=None):
        o = self.opts
        if o.lun == "direct":
            return self.ctx.open_direct()
        blocks = blocks or o.vlun_blocks
        try:
            # No scrub: the vLUN writes its own blocks only (a scrub would
            # zero its chunks whole at release).
            return self.ctx.create_virtual(blocks, scrub=False)
        except CxlFlashError as e:
            raise BenchError(f"cannot create a {blocks}-block virtual LUN on the "
                             f"target: {e.strerror}") from None

    def prefill(self, lun, progress):
        """Write every block the I/O covers once, so neither side pays
        first-write costs (or reads holes).  Not on a target read as it is."""
        if self.read_only:
            return
        t0 = time.monotonic()
        end = region_blocks(lun, self.opts)
        bs = lun.block_size
        step = max(1, (4 << 20) // bs)
        buf = aligned_buffer(step * bs)
        for lba in range(0, end, step):
            lun.write(lba, memoryview(buf)[:min(step, end - lba) * bs])
            done = min(lba + step, end) * bs
            progress.count("prefill", done, end * bs, done / max(time.monotonic() - t0, 1e-9))
        self.log.spent("prefill", time.monotonic() - t0)

    def close(self):
        ctx = getattr(self, "ctx", None)
        if self.opts.connect and ctx is not None:
            # A client's adapter.close() only closes its connection: the
            # daemon keeps the context (and its chunks) until the adapter
            # fd closes. Close the context itself (RELEASE, DETACH, close).
            try:
                ctx.close()
            except OSError:
                pass
        if getattr(self, "adapter", None) is not None:
            self.adapter.close()
        if self._backing is not None:
            self._backing.close()
            self._backing = None
