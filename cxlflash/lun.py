"""``VirtualLun`` and ``DirectLun``: LUNs opened through a context, with
the block library's semantics (the model of ``cblk_*``) in idiomatic
Python.

Units: LBAs and sizes are in blocks of ``block_size`` bytes (the LUN's
native block, 4096 or 512), relative to the LUN object.  Buffers are
anything with the buffer protocol (bytes, bytearray, memoryview, numpy
arrays), C-contiguous, a multiple of ``block_size`` bytes; nothing is
copied.

Arguments (cxlflash/_args.py): an integer parameter of the wrong type
(float, str, bytes, None) is a ``TypeError`` naming it; an LBA, count or
size outside the LUN (negative, beyond the logical size) is a
``CxlFlashError`` (errno EINVAL) naming the valid range -- raised before
any buffer is allocated or any I/O is issued.

Errors: ``CxlFlashError`` from the driver (ENOSPC, ENOMEM, ...),
:class:`cxlflash.AfuError` when the AFU refuses a command,
:class:`cxlflash.AdapterResetError` after an AFU reset that could not be
recovered, ``ValueError`` after :meth:`close`.
"""
from __future__ import annotations

import errno
import threading
from functools import partial
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from typing_extensions import Self
    import numpy as np
    import numpy.typing as npt
else:
    from ._core._lazy import numpy as np            # imported on first use

from . import uapi, _args
from ._core.datapath import DataPath, LIST_READ, LIST_WRITE, LIST_UNMAP
from ._core.engine import OP_READ, OP_WRITE, OP_FLUSH, OP_ZERO, OP_DISCARD
from .backing import aligned_buffer
from ._core.errors import io_error
from ._core.tables import MC_CHUNK_SIZE
from .errors import CxlFlashError


if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = ["VirtualLun", "DirectLun", "ListResult", "LIST_READ", "LIST_WRITE",
           "LIST_UNMAP", "CHUNK_BLOCKS"]

# Blocks per chunk, as the public name of this module (its one source is
# the core's MC_CHUNK_SIZE).
CHUNK_BLOCKS = int(MC_CHUNK_SIZE)
_STAT_NAMES = ("num_reads", "num_writes", "num_blocks_read", "num_blocks_written",
               "num_unmaps", "num_blocks_unmapped", "num_errors", "num_list_calls",
               "num_areads", "num_awrites")
# The engine's entry points bound per object (_bind_async), dropped when the
# data path changes.
_ASYNC_BOUND = ("aread", "areadinto", "awrite", "_loop_read", "_loop_readinto",
                "_loop_write")


class ListResult:
    """The outcome of :meth:`listio`: per request, the blocks transferred or
    the error.  ``status`` (int64 array: blocks, or < 0 on error), ``ok``
    (all succeeded), :meth:`errors` (index -> exception), :meth:`check`
    (raise the first error)."""

    def __init__(self, lun: Any, status: np.ndarray, codes: np.ndarray, lbas: Any,
                 nblocks: Any) -> None:
        self.status: npt.NDArray[np.int64] = status
        self._codes = codes
        self._lun = lun
        self._lbas = lbas           # as the caller gave them: read on errors only
        self._nblocks = nblocks

    @property
    def ok(self) -> bool:
        return bool((self.status >= 0).all())

    def __len__(self) -> int:
        return len(self.status)

    def error(self, i: int) -> Optional[OSError]:
        """The exception of request ``i``, or None."""
        s = int(self.status[i])
        if s >= 0:
            return None
        # the one mapping, the synchronous path's too
        return io_error(s, afu_rc=int(self._codes[i]), handle=self._lun.handle,
                        lba=self._lba(i), nblocks=int(np.ravel(self._nblocks)[i]),
                        size=self._lun.size, index=i)

    def _lba(self, i):
        return int(np.ravel(self._lbas)[i])

    def errors(self) -> Dict[int, OSError]:
        return {i: self.error(i) for i in  # type: ignore[misc]
                np.flatnonzero(self.status < 0).tolist()}

    def check(self) -> "ListResult":
        """Raise the first request's error, if any; return self."""
        bad = np.flatnonzero(self.status < 0)
        if len(bad):
            raise self.error(int(bad[0]))  # type: ignore[misc]
        return self


class _Lun:
    """What virtual and direct LUNs share: the data path and statistics."""

    virtual = False

    def __init__(self, context, disk):
        self.context = context
        self.disk = disk
        self.adapter = context.adapter
        self.handle: Optional[int] = None
        self.closed = False
        self._dp = None
        self._size = 0
        self._stats_base = dict.fromkeys(_STAT_NAMES, 0)
        self._stats_extra = {"num_reset_contexts": 0}
        self._direct = False                # the backing store is O_DIRECT
        self._lock = threading.Lock()
        self._close_lock = threading.RLock()

    # -- binding to the context's table ---------------------------------------------

    def _record(self):
        return self.adapter._context_record(self.context.context_id)

    def _live_record(self):
        """The context's record; a clear error when this object or its
        context is gone."""
        self._check_open()
        if self.adapter._gone():
            # The driver is closed or out of reach: its own error (ENODEV,
            # with the reason), as the ioctl would have answered.
            self.adapter._channel()
            raise CxlFlashError(errno.ENODEV, "the adapter is closed")
        rec = self._record()
        if rec is None:
            # A recovery in another thread may have changed the context's id
            # (in the driver, or in this process's replica) and not yet the
            # Context's: it does both under the context's lock.
            with self.context._lock:
                rec = self._record()
        if rec is None or self.handle is None or rec.rht_lun[self.handle] is None:
            raise CxlFlashError(errno.EINVAL, f"{type(self).__name__} handle "
                                f"{self.handle}: its context was detached or its "
                                "handle released behind this object's back; close() it")
        return rec

    def _rebind(self):
        """(Re)create the data path on the context's current table."""
        rec = self._record() or self._live_record()     # (or why there is none)
        glun = rec.rht_lun[self.handle].parent
        old = self._dp
        if (old is not None and old.table is rec.table
                and old.fd == glun.backing.fd):
            # A recovery keeps the table: keep the data path, whose caller
            # may be about to re-drive a transfer (and count it) on it.
            old.max_xfer = self.context.max_xfer
            return
        if old is not None:
            for k, v in old.get_stats().items():
                self._stats_base["num_" + k] += v
            old.close()
        dp = DataPath(rec.table, self.handle, glun.backing.fd, glun.blk_len,
                      max_xfer=self.context.max_xfer,
                      zero_mode=glun.backing.zero_mode)
        dp.limit = self._size
        dp.on_reset = self._recover
        self._dp = dp
        # The core checks lba as _args does (TypeError for a non-integer,
        # CxlFlashError(EINVAL) outside 0..2**64-1 or beyond the logical
        # size): the object's readinto and write are the core's own
        # methods, with no Python frame on the hot path.
        self.readinto = dp.readinto      # type: ignore[method-assign]
        self.write = dp.write            # type: ignore[method-assign]
        self.block_size: int = glun.blk_len
        self._direct = bool(getattr(glun.backing, "direct", False))
        for name in _ASYNC_BOUND:
            self.__dict__.pop(name, None)

    def _after_fork(self):
        self._rebind()

    def _recover(self):
        """After an AFU reset: recover the context (once per reset, whoever
        sees it first) so the data path can re-drive the I/O, as the block
        library does.  Returns True when the context is usable again."""
        try:
            self.context.recover()
        except (CxlFlashError, ValueError):
            return False
        return self._record() is not None and not self._record().err_recovery_active

    # -- synchronous I/O ------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The logical size in blocks."""
        return self._size

    def __len__(self) -> int:
        return self._size

    # The hot paths are the core's own methods, bound per object in
    # _rebind (the core checks lba as _args does); these say what they do
    # and serve a call through the class.

    def readinto(self, lba: int, buffer: Any) -> int:
        """Read ``len(buffer) // block_size`` blocks at ``lba`` into
        ``buffer``; returns the number of blocks read."""
        return self._dp.readinto(lba, buffer)

    def write(self, lba: int, data: Any) -> int:
        """Write ``data`` at ``lba``; returns the number of blocks written."""
        return self._dp.write(lba, data)

    def read(self, lba: int, nblocks: int) -> bytearray:
        """Read ``nblocks`` blocks at ``lba``; returns a bytearray."""
        lba = _args.u64(lba, "lba")
        nblocks = _args.u64(nblocks, "nblocks")
        self._check_open()
        _args.within(lba, nblocks, self._size)       # before allocating
        if self._direct:
            # O_DIRECT reads into an aligned buffer; the caller gets a copy
            aligned = aligned_buffer(nblocks * self.block_size)
            try:
                self._dp.readinto(lba, aligned)
            except OSError as e:
                raise self.adapter._io_error(e) from None
            return bytearray(aligned)
        buf = bytearray(nblocks * self.block_size)
        try:
            self._dp.readinto(lba, buf)
        except OSError as e:
            raise self.adapter._io_error(e) from None
        return buf

    def unmap(self, lba: int, nblocks: int) -> int:
        """Zero ``nblocks`` blocks at ``lba`` (holes are punched in files,
        BLKZEROOUT on block devices); returns the number of blocks."""
        lba = _args.u64(lba, "lba")
        nblocks = _args.u64(nblocks, "nblocks")
        try:
            return self._dp.unmap(lba, nblocks)
        except OSError as e:
            raise self.adapter._io_error(e) from None

    def translate(self, lbas: Any) -> npt.NDArray[np.uint64]:
        """The physical LBAs (uint64 array) the AFU addresses for ``lbas``."""
        lbas = _args.lba_array(lbas, "lbas")
        self._check_open()
        if len(lbas) and int(lbas.max()) >= self._size:
            raise CxlFlashError(errno.EINVAL, f"LBA {int(lbas.max())} is beyond the "
                                f"logical size of {self._size} blocks (LBAs "
                                f"0..{self._size - 1})")
        return self._dp.translate(lbas)

    def listio(self, ops: Any, lbas: Any, nblocks: Any, buffer: Any,
               offsets: Any = None, lat_ns: Optional[npt.NDArray[np.int64]] = None,
               qd: int = 64) -> ListResult:
        """Issue a batch of requests, up to ``qd`` in flight at a time,
        without the GIL (the block library's ``cblk_listio``).

        ``ops``: LIST_READ (1), LIST_WRITE (2) or LIST_UNMAP (3) per
        request; ``lbas``, ``nblocks``: per request; ``buffer``: one
        writable buffer holding every request's data, request ``i`` at
        ``offsets[i]`` bytes (default: packed in order).  ``qd``: requests
        in flight at once (1..65536).  ``lat_ns``: an optional int64 array
        that receives per-request latencies.  Returns a
        :class:`ListResult`; one failing request does not stop the others.
        Requests in flight together may complete in any order: two that
        overlap, one of them a write, have no defined order.
        """
        # The core checks every array (integers only, in range, equal
        # lengths) and packs the requests when offsets is None.
        if lat_ns is not None and not (isinstance(lat_ns, np.ndarray)
                                       and lat_ns.dtype == np.int64):
            raise TypeError("lat_ns must be an int64 numpy array")
        self._check_open()
        eng = self.adapter._engine_of(self._dp.fd)
        if (eng is None or eng.closed) and self.adapter._gone():
            # Every request fails as the closed adapter's data path fails it
            # (one failing request does not stop the others).
            _args.qd(qd)
            status, codes = self._dp.listio(ops, lbas, nblocks, buffer, offsets, lat_ns)
        else:
            status, codes = self._engine().listio(self._dp, ops, lbas, nblocks,
                                                       buffer, offsets, lat_ns, qd)
        return ListResult(self, status, codes, lbas, nblocks)

    # -- flush, write-zeroes, discard -------------------------------------------------------

    def flush(self) -> None:
        """Make every write completed before this call durable (fdatasync
        of the backing store, issued after every request submitted
        before it has completed)."""
        self._check_open()
        self._engine().submit(self._dp, OP_FLUSH, 0, None, None, 0)

    def write_zeroes(self, lba: int, nblocks: int) -> int:
        """Zero ``nblocks`` blocks at ``lba`` (they read back as zeros);
        returns the number of blocks."""
        self._check_open()
        return self._engine().submit(self._dp, OP_ZERO, lba, nblocks, None, 0)

    def discard(self, lba: int, nblocks: int) -> int:
        """Discard ``nblocks`` blocks at ``lba``: their space may be
        released (holes punched in files); they read back as zeros.
        Returns the number of blocks."""
        self._check_open()
        return self._engine().submit(self._dp, OP_DISCARD, lba, nblocks, None, 0)

    # -- asynchronous I/O ---------------------------------------------------------------------
    #
    # One engine per adapter (cxlflash._core.engine) runs them: checked and
    # translated at submission (bad arguments raise here, not in the
    # future), completed without a Python thread per request.  A future's
    # result() raises what the synchronous call would.  Once submitted a
    # request runs to completion: cancelling its future or task does not
    # stop it, and its buffer stays alive until it is done.

    def _engine(self):
        """The engine that runs this LUN's requests: the adapter's, or the
        backing store's own (an RBD image's)."""
        return self.adapter._engine_for(self._dp.fd if self._dp is not None else -1)

    def _bind_async(self):
        """Bind the engine's entry points to this object's data path, so
        that a future or an asyncio read costs no Python frame of ours
        (the core checks every argument)."""
        self._check_open()
        eng, dp = self._engine(), self._dp
        self.aread = partial(eng.aread, dp)
        self.areadinto = partial(eng.areadinto, dp)
        self.awrite = partial(eng.awrite, dp)
        self._loop_read = partial(eng.aread_loop, dp)
        self._loop_readinto = partial(eng.areadinto_loop, dp)
        self._loop_write = partial(eng.awrite_loop, dp)
        return self

    def aread(self, lba: int, nblocks: int) -> "Future[bytearray]":
        """Start a read; returns a ``concurrent.futures.Future`` of the data."""
        return self._bind_async().aread(lba, nblocks)

    def areadinto(self, lba: int, buffer: Any) -> "Future[int]":
        """Start a read into ``buffer``; a Future of the block count."""
        return self._bind_async().areadinto(lba, buffer)

    def awrite(self, lba: int, data: Any) -> "Future[int]":
        """Start a write; a Future of the block count."""
        return self._bind_async().awrite(lba, data)

    def aflush(self) -> "Future[None]":
        """Start a :meth:`flush`; a Future of None."""
        self._check_open()
        return self._engine().submit(self._dp, OP_FLUSH, 0, None, None, 1)

    def awrite_zeroes(self, lba: int, nblocks: int) -> "Future[int]":
        """Start a :meth:`write_zeroes`; a Future of the block count."""
        self._check_open()
        return self._engine().submit(self._dp, OP_ZERO, lba, nblocks, None, 1)

    def adiscard(self, lba: int, nblocks: int) -> "Future[int]":
        """Start a :meth:`discard`; a Future of the block count."""
        self._check_open()
        return self._engine().submit(self._dp, OP_DISCARD, lba, nblocks, None, 1)

    def _loop_read(self, lba, nblocks):
        return self._bind_async()._loop_read(lba, nblocks)

    def _loop_readinto(self, lba, buffer):
        return self._bind_async()._loop_readinto(lba, buffer)

    def _loop_write(self, lba, data):
        return self._bind_async()._loop_write(lba, data)

    async def read_async(self, lba: int, nblocks: int) -> bytearray:
        """``await lun.read_async(lba, n)``: the data (completed through
        an eventfd on the running loop, no executor)."""
        return await self._loop_read(lba, nblocks)

    async def readinto_async(self, lba: int, buffer: Any) -> int:
        return await self._loop_readinto(lba, buffer)

    async def write_async(self, lba: int, data: Any) -> int:
        return await self._loop_write(lba, data)

    async def flush_async(self) -> None:
        self._check_open()
        await self._engine().submit(self._dp, OP_FLUSH, 0, None, None, 2)

    async def write_zeroes_async(self, lba: int, nblocks: int) -> int:
        self._check_open()
        return await self._engine().submit(self._dp, OP_ZERO, lba, nblocks, None, 2)

    async def discard_async(self, lba: int, nblocks: int) -> int:
        self._check_open()
        return await self._engine().submit(self._dp, OP_DISCARD, lba, nblocks,
                                                None, 2)

    # -- statistics --------------------------------------------------------------------------

    def stats(self) -> Dict[str, int]:
        """Counters modelled on the block library's ``chunk_stats_t``."""
        out = {"block_size": self.block_size, "num_paths": 1,
               "max_transfer_size": self.context.max_xfer}
        live = self._dp.get_stats() if self._dp is not None else {}
        for name in _STAT_NAMES:
            out[name] = self._stats_base[name] + live.get(name[4:], 0)
        out.update(self._stats_extra)
        return out

    # -- lifetime ------------------------------------------------------------------------------

    def _check_open(self):
        if self.closed:
            raise self._closed_error()

    def _closed_error(self):
        return ValueError(f"I/O on a closed {type(self).__name__}: it was released "
                          "or its context detached")

    def close(self) -> None:
        """RELEASE the resource handle.  Safe to call twice.

        When the release fails in a way that leaves the handle open (EAGAIN:
        the AFU sync failed; EINTR), the object stays open: close it again.
        """
        with self._close_lock:
            if self.closed:
                return
            ctx = self.context
            if not (ctx.closed or self.adapter._gone()):
                arg = uapi.dk_cxlflash_release()
                arg.context_id = ctx.context_id
                arg.rsrc_handle = self.handle
                try:
                    ctx._ioctl(self.disk, uapi.DK_CXLFLASH_RELEASE, arg)
                except CxlFlashError as e:
                    if e.errno != errno.EINVAL:      # the handle is still open
                        self._clamp_size()
                        raise
                    self._mark_closed()              # it was already gone
                    raise
            self._mark_closed()

    def _clamp_size(self):
        """After a failed resize or release: the size never exceeds what
        the handle still holds."""

    def _mark_closed(self):
        """The handle is gone (released, or with its context): the release
        waited for its requests in flight; their futures are completed
        before this returns."""
        if self._dp is not None:
            eng = self.adapter._engine_of(self._dp.fd)
            if eng is not None and self._dp.aio_pending:
                eng.settle(self._dp)
            self._dp.close()
        self.closed = True
        try:
            self.context.luns.remove(self)
        except ValueError:
            pass

    release = close

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VirtualLun(_Lun):
    """A thin virtual LUN: an exact logical size (``size`` blocks) over an
    allocation of whole 65536-block chunks.

    Growing within the allocated chunks issues no ioctl; growing beyond
    them issues one VLUN_RESIZE.  Getting fewer chunks than asked raises
    ENOSPC and leaves the size as it was, unless ``best_effort``.
    """

    virtual = True

    def __init__(self, context, disk, size=0, *, scrub=True, best_effort=False):
        size = _args.size(size, "size")
        super().__init__(context, disk)
        self.scrub = bool(scrub)
        arg = uapi.dk_cxlflash_uvirtual()
        arg.context_id = context.context_id
        arg.lun_size = 0
        if self.scrub:
            arg.hdr.flags = uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME
        context._ioctl(disk, uapi.DK_CXLFLASH_USER_VIRTUAL, arg)
        self.handle = arg.rsrc_handle
        context.luns.append(self)
        try:
            self._rebind()
            if size:
                self.set_size(size, best_effort=best_effort)
        except BaseException:
            try:
                self.close()
            except CxlFlashError:
                pass        # still open: the context's close releases it
            raise

    @property
    def chunks(self) -> int:
        """Chunks allocated."""
        return self._live_record().table.lxt_count(self.handle)

    @property
    def allocated(self) -> int:
        """Blocks allocated (a whole number of chunks)."""
        return self.chunks * MC_CHUNK_SIZE

    @property
    def lun_blocks(self) -> int:
        """Blocks of the physical LUN under this vLUN."""
        glun = self._live_record().rht_lun[self.handle].parent
        return glun.max_lba + 1

    def _resize_chunks(self, chunks):
        arg = uapi.dk_cxlflash_resize()
        arg.context_id = self.context.context_id
        arg.rsrc_handle = self.handle
        blocks_4k = chunks * MC_CHUNK_SIZE * self.block_size // uapi.CXLFLASH_BLOCK_SIZE
        arg.req_size = blocks_4k
        try:
            self.context._ioctl(self.disk, uapi.DK_CXLFLASH_VLUN_RESIZE, arg)
        except CxlFlashError as e:
            if e.errno != errno.EAGAIN:
                raise
            # The size change happened but the AFU sync failed: the kernel
            # repairs that with a resize to the same size.
            self.context._ioctl(self.disk, uapi.DK_CXLFLASH_VLUN_RESIZE, arg)
        return self.chunks

    def _clamp_size(self):
        # Whatever happened to the chunks, the size never exceeds them.
        try:
            allocated = self.chunks * MC_CHUNK_SIZE
        except (CxlFlashError, ValueError):
            allocated = 0
        if self._size > allocated:
            self._set_limit(allocated)

    def _set_limit(self, blocks):
        self._size = blocks
        self._dp.limit = blocks

    def set_size(self, blocks: int, *, best_effort: bool = False,
                 release: bool = False) -> int:
        """Set the logical size to ``blocks`` blocks; returns the new size.

        ``release``: also give back chunks the new size does not need (they
        are zeroed first when the vLUN was opened with ``scrub``).
        ``best_effort``: when the LUN runs out of chunks, take what there
        is (the kernel's partial growth) instead of raising ENOSPC.
        When a resize fails half-way (an AFU sync failure after the chunks
        changed), :attr:`size` is what the vLUN still holds.
        """
        blocks = _args.size(blocks, "blocks")
        lun_blocks = self.lun_blocks          # a clear error if the vLUN is gone
        if blocks > lun_blocks:
            raise CxlFlashError(errno.EINVAL, f"{blocks} blocks exceed the physical "
                                f"LUN ({lun_blocks} blocks: sizes 0..{lun_blocks})")
        need = -(-blocks // MC_CHUNK_SIZE)
        have = self.chunks
        if need > have or (release and need < have):
            try:
                try:
                    got = self._resize_chunks(need)
                except CxlFlashError as e:
                    # Not a single chunk free: best effort takes what there is.
                    if e.errno != errno.ENOSPC or not best_effort or need < have:
                        raise
                    got = self.chunks
                if got < need and not best_effort:
                    self._resize_chunks(have)      # give the partial growth back
                    raise CxlFlashError(
                        errno.ENOSPC, f"the LUN has room for {got - have} more chunks; "
                        f"{need - have} are needed for {blocks} blocks (the size "
                        f"stays {self._size}; pass best_effort=True to take what "
                        "there is)")
            except BaseException:
                self._clamp_size()
                raise
            if got < need:
                blocks = got * MC_CHUNK_SIZE
        self._set_limit(blocks)
        return blocks

    def __repr__(self):
        if self.closed:
            return "<VirtualLun closed>"
        try:
            chunks = self.chunks
        except Exception:
            chunks = "?"
        return (f"<VirtualLun handle={self.handle} size={self._size} blocks "
                f"chunks={chunks} block_size={getattr(self, 'block_size', '?')}>")


class DirectLun(_Lun):
    """The whole physical LUN, LBAs passed through (USER_DIRECT)."""

    def __init__(self, context, disk):
        super().__init__(context, disk)
        arg = uapi.dk_cxlflash_udirect()
        arg.context_id = context.context_id
        context._ioctl(disk, uapi.DK_CXLFLASH_USER_DIRECT, arg)
        self.handle = arg.rsrc_handle
        self._size = arg.last_lba + 1
        context.luns.append(self)
        try:
            self._rebind()                  # limit: the LUN's size
        except BaseException:
            try:
                self.close()
            except CxlFlashError:
                pass
            raise

    def __repr__(self):
        if self.closed:
            return "<DirectLun closed>"
        return (f"<DirectLun handle={self.handle} size={self._size} blocks "
                f"block_size={getattr(self, 'block_size', '?')}>")
