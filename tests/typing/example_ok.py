"""A typed program using the whole public API: ``mypy --strict`` must
accept it (tests/test_typing.py), and it runs (the test runs it too).

Every value is annotated with the type the package promises, so a wrong
annotation in the package (or an ``Any`` where a type belongs) shows up
here as an error.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from typing import Dict, List, Optional

import numpy as np
import numpy.typing as npt

import cxlflash
from cxlflash import (LIST_READ, LIST_UNMAP, LIST_WRITE, AdapterResetError, AfuError,
                      CxlFlashError, Context, DirectLun, Disk, ForkedAdapterError,
                      ListResult, VirtualLun, aligned_buffer, ioctl, uapi)


def object_api() -> int:
    data: npt.NDArray[np.uint8] = aligned_buffer(8 * 4096)
    data[:] = 7
    with cxlflash.Adapter() as a, \
            a.open_disk(a.create_lun(size=4 << 30)) as disk, \
            disk.attach(os.O_RDWR) as ctx, \
            ctx.create_virtual(size=100_000) as vlun:
        adapter: cxlflash.Adapter = a
        d: Disk = disk
        c: Context = ctx
        v: VirtualLun = vlun
        wwid: bytes = d.wwid
        port: int = d.port
        writable: bool = d.writable
        luns: List[bytes] = adapter.luns()
        state: str = adapter.state
        cid: int = c.context_id
        fd: int = c.adap_fd
        n: int = v.write(0, data)
        n += v.readinto(0, bytearray(4096))
        got: bytearray = v.read(0, 8)
        assert bytes(got) == bytes(data)
        size: int = v.set_size(300_000)
        size = v.size + v.chunks + v.allocated + v.lun_blocks
        phys: npt.NDArray[np.uint64] = v.translate([0, 1, 70_000])
        fut: Future[bytearray] = v.aread(65534, 4)
        four: bytearray = fut.result()
        fn: Future[int] = v.awrite(0, bytes(4096))
        n += fn.result() + v.areadinto(0, bytearray(4096)).result()
        res: ListResult = v.listio([LIST_READ, LIST_WRITE, LIST_UNMAP], [0, 70_000, 5],
                                   [1, 1, 1], bytearray(3 * 4096), qd=8)
        v.flush()
        n += v.write_zeroes(0, 1) + v.discard(1, 1)
        flushed: Future[None] = v.aflush()
        flushed.result()
        n += v.awrite_zeroes(0, 1).result() + v.adiscard(1, 1).result()

        async def in_a_loop() -> int:
            data: bytearray = await v.read_async(0, 1)
            k: int = await v.readinto_async(0, data)
            k += await v.write_async(0, data)
            await v.flush_async()
            k += await v.write_zeroes_async(0, 1) + await v.discard_async(1, 1)
            return k

        n += asyncio.run(in_a_loop())
        kind: str = adapter.engine.kind
        status: npt.NDArray[np.int64] = res.status
        ok: bool = res.ok
        err: Optional[OSError] = res.error(0)
        errs: Dict[int, OSError] = res.errors()
        res = res.check()
        stats: Dict[str, int] = v.stats()
        n += v.unmap(0, 1)
        with a.open_disk(a.create_lun(size=1 << 30)) as disk2, \
                disk2.attach() as ctx2, ctx2.open_direct() as direct:
            dl: DirectLun = direct
            n += dl.write(0, bytes(4096)) + len(dl) + dl.block_size
        healthy: bool = c.recover()
        del wwid, port, writable, luns, state, cid, fd, size, phys, four, status, ok
        del err, errs, stats, healthy, kind
        return n + len(res)


def ioctl_level() -> int:
    with cxlflash.Adapter() as a:
        disk: Disk = a.open_disk(a.add_lun(None, size=1 << 30))
        arg = uapi.dk_cxlflash_attach()
        arg.hdr.flags = os.O_RDWR
        rc: int = ioctl(disk, uapi.DK_CXLFLASH_ATTACH, arg)
        uv = uapi.dk_cxlflash_uvirtual()
        uv.context_id = arg.context_id
        uv.lun_size = 16
        ioctl(disk, uapi.DK_CXLFLASH_USER_VIRTUAL, uv)
        context_id: int = arg.context_id
        handle: int = uv.rsrc_handle
        n: int = a.write(context_id, handle, 0, bytes(4096))
        back: bytes = a.read(context_id, handle, 0, 1)
        out: npt.NDArray[np.uint64] = a.translate(context_id, handle, [0, 1])
        a.inject_fault("sync", 1)
        a.reset()
        os.close(arg.adap_fd)
        del back, out
        return rc + n


def errors() -> List[str]:
    seen: List[str] = []
    try:
        raise AfuError(0x13, "LBA beyond the vLUN")
    except AfuError as e:
        rc: int = e.afu_rc
        index: Optional[int] = e.index
        seen.append(f"{rc:#x} {index} {e.errno}")
    for exc in (CxlFlashError(22, "bad"), AdapterResetError(),
                ForkedAdapterError(os.getpid())):
        assert isinstance(exc, OSError)
        seen.append(f"{type(exc).__name__} {exc.errno}")
    return seen


if __name__ == "__main__":
    print(object_api(), ioctl_level(), errors())
