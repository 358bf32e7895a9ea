"""The core workloads and their baselines, defined once for both front ends.

``cxlflash bench`` (the core rows of the matrix, :mod:`.rows`) and the
pytest-benchmark suites (``benchmarks/bench_core.py``,
``benchmarks/bench_driver.py``) time the same set-ups, the same sides and
the same baselines, from here; a front end chooses only the sizes and how
long and how often it times them.

A side is a method that does one call's work and may return an *undo*:
a callable that puts the state back, run untimed after the call (every
harness of both front ends follows this rule).  ``check()`` runs the
sides once, untimed, and raises :class:`BenchError` when the workload
and its baseline disagree -- a figure is only worth something when both
sides did the same work.
"""
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._core._lazy import numpy as np

from .. import reference, uapi
from .._core.allocator import ChunkAllocator
from .._core.tables import MC_CHUNK_SHIFT, MC_CHUNK_SIZE, ResourceTable
from ..adapter import Adapter, ioctl
from ..driver import superpipe
from ..driver.context import Caller
from .options import BenchError

CLONE_CHUNKS = 1 << 20      # the clone source: a vLUN of 1 M mapped chunks


class Translate:
    """``translate_many`` of ``n`` random int64 vLBAs over a vLUN of
    ``chunks`` mapped chunks (scattered over a 1 M-chunk LUN) into a
    preallocated ``out``, on a bare ResourceTable.

    Sides: ``core`` (``table.translate_many``), ``numpy`` (the formula
    with ``out=``, :func:`cxlflash.reference.translate`), ``copyto``
    (``np.copyto`` of the vLBAs into ``out``: the memory-bandwidth bound,
    8 B read and 8 B written per LBA)."""

    def __init__(self, n, chunks=64, seed=2024):
        rng = np.random.default_rng(seed)
        self.table = ResourceTable()
        self.handle = self.table.open_virtual(3)
        self.table.grow(self.handle, rng.permutation(1 << 20)[:chunks], 0, 1)
        self.vlbas = rng.integers(0, chunks * MC_CHUNK_SIZE, size=n, dtype=np.int64)
        self.out = np.empty(n, dtype=np.uint64)
        self.lxt = self.table.lxt(self.handle)

    def core(self):
        self.table.translate_many(self.handle, self.vlbas, out=self.out)

    def numpy(self):
        reference.translate(self.lxt, self.vlbas, out=self.out)

    def copyto(self):
        np.copyto(self.out, self.vlbas.view(np.uint64))

    def check(self):
        self.core()
        if not np.array_equal(self.out, reference.translate(self.lxt, self.vlbas)):
            raise BenchError("translate_many disagrees with the numpy formula")


class Alloc:
    """Allocating ``per`` chunks a call from a LUN of ``total`` chunks.

    Sides: ``core`` (``ChunkAllocator.alloc_many``; its undo frees them)
    and ``python`` (the kernel's ba_alloc loop in pure Python,
    :class:`cxlflash.reference.ChunkAllocator`; its undo starts a fresh
    allocator when the next call would not find ``per`` free chunks).
    Both hand out the same chunk numbers: the next-fit order is the
    kernel's."""

    def __init__(self, total, per):
        if per > total:
            raise BenchError(f"cannot allocate {per} of {total} chunks a call")
        self.total, self.per = total, per
        self.alloc = ChunkAllocator(total)
        self.ref = reference.ChunkAllocator(total)

    def core(self):
        auns = self.alloc.alloc_many(self.per)
        return lambda: self.alloc.free_many(auns)

    def python(self):
        self.ref.alloc_many(self.per)
        if self.ref.ba_space() < self.per:
            return self._fresh_ref
        return None

    def _fresh_ref(self):
        self.ref = reference.ChunkAllocator(self.total)

    def check(self):
        """Calls of both on fresh allocators, with frees between them:
        the same chunks (at most 16 k a call: the order is what counts)."""
        n = min(self.per, 1 << 14)
        core, ref = ChunkAllocator(self.total), reference.ChunkAllocator(self.total)
        for _ in range(3):
            got, want = core.alloc_many(n), ref.alloc_many(n)
            if got.tolist() != want:
                raise BenchError("alloc_many disagrees with the kernel's allocation loop")
            core.free_many(got[::2])
            ref.free_many(want[::2])


class Clone:
    """DK_CXLFLASH_VLUN_CLONE of a vLUN of ``chunks`` mapped chunks, the
    ioctl the product runs, issued with ``cxlflash.ioctl`` as a program
    would: from a context owned by this process's parent (set up through
    the driver's entry point as that parent: a sparse memory LUN of
    ``chunks`` + 64 chunks) into a context of this process.

    Sides: ``clone`` (the ioctl; its undo, RELEASE of the clone) and
    ``copyto`` (``np.copyto`` of the source's LXT, 8 bytes a chunk).
    ``close()`` gives everything back."""

    def __init__(self, chunks=CLONE_CHUNKS):
        self.chunks = chunks
        self.adapter = a = Adapter()
        self._fds = []
        try:
            self.wwid = a.add_lun(None, size=(chunks + 64) * MC_CHUNK_SIZE * 4096)  # sparse
            self.disk = a.open_disk(self.wwid)
            parent = Caller(os.getppid(), 1)
            self.src = self._attach(parent)
            uv = uapi.dk_cxlflash_uvirtual()
            uv.context_id = self.src
            uv.lun_size = chunks * MC_CHUNK_SIZE
            superpipe.disk_ioctl(a.driver, self.disk.sdev, self.disk,
                                 uapi.DK_CXLFLASH_USER_VIRTUAL, uv, parent)
            self.handle = uv.rsrc_handle
            self.dst = self._attach(None)
            self.lxt = a._context_record(self.src).table.lxt(self.handle)
            if len(self.lxt) != chunks:
                raise BenchError(f"the clone source has {len(self.lxt)} chunks, not {chunks}")
            self.allocator = a.driver.gluns[self.wwid].allocator
            self.copy = np.empty_like(self.lxt)
        except BaseException:
            self.close()
            raise

    def _attach(self, caller):
        at = uapi.dk_cxlflash_attach()
        at.hdr.flags = os.O_RDWR
        if caller is None:
            ioctl(self.disk, uapi.DK_CXLFLASH_ATTACH, at)
        else:
            superpipe.disk_ioctl(self.adapter.driver, self.disk.sdev, self.disk,
                                 uapi.DK_CXLFLASH_ATTACH, at, caller)
        self._fds.append(at.adap_fd)
        return at.context_id

    def clone(self):
        cl = uapi.dk_cxlflash_clone()
        cl.context_id_src = self.src
        cl.context_id_dst = self.dst
        ioctl(self.disk, uapi.DK_CXLFLASH_VLUN_CLONE, cl)
        return self.release

    def release(self):
        """RELEASE of the clone by this process."""
        rl = uapi.dk_cxlflash_release()
        rl.context_id = self.dst
        rl.rsrc_handle = self.handle
        ioctl(self.disk, uapi.DK_CXLFLASH_RELEASE, rl)

    def copyto(self):
        np.copyto(self.copy, self.lxt)

    def clone_refs(self):
        """Clone references on the source's first chunk."""
        return self.allocator.clone_count(int(self.lxt[0]) >> MC_CHUNK_SHIFT)

    def check(self):
        """One clone (untimed): it maps the source's chunks, each with one
        clone reference; then released."""
        self.clone()
        try:
            if not np.array_equal(self.adapter._context_record(self.dst).table.lxt(self.handle),
                                  self.lxt) or self.clone_refs() != 1:
                raise BenchError("the clone does not map the source's chunks")
        finally:
            self.release()

    def check_released(self):
        if self.clone_refs() != 0:
            raise BenchError("clone references leaked")

    def close(self):
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.adapter.close()
