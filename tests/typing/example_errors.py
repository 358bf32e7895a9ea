"""Deliberate type errors: ``mypy --strict`` must report every line marked
``# E: <error code>`` (tests/test_typing.py checks each one is reported, with
that code, and that nothing else is).  Not meant to run."""
from __future__ import annotations

import os

import cxlflash


def misuse() -> None:
    with cxlflash.Adapter() as a, \
            a.open_disk(a.create_lun(size=1 << 30)) as disk, \
            disk.attach(os.O_RDWR) as ctx, \
            ctx.create_virtual(size=16) as vlun:
        vlun.write("zero", b"x")                      # E: arg-type
        vlun.read(0, 1.5)                             # E: arg-type
        vlun.set_size("big")                          # E: arg-type
        vlun.no_such_method()                         # E: attr-defined
        name: str = ctx.context_id                    # E: assignment
        data: str = vlun.read(0, 1)                   # E: assignment
        disk.attach(mode="rw")                        # E: arg-type
        a.create_lun(size=None)                       # E: arg-type
        res = vlun.listio([1], [0], [1], bytearray(4096))
        text: str = res.status                        # E: assignment
        flag: str = res.ok                            # E: assignment
        vlun.listio([1], [0], [1], bytearray(4096), qd="deep")  # E: arg-type
        vlun.flush(0)                                 # E: call-arg
        fut = vlun.aread(0, 1)
        n: int = fut.result()                         # E: assignment
        del name, data, text, flag, n
    try:
        pass
    except cxlflash.AfuError as e:
        code: str = e.afu_rc                          # E: assignment
        del code
