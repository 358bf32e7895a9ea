import asyncio
from concurrent.futures import Future
from typing import Any, Dict, Optional, SupportsIndex, Tuple, Union

import numpy as np
import numpy.typing as npt

from .datapath import DataPath

OP_READ: int
OP_WRITE: int
OP_FLUSH: int
OP_ZERO: int
OP_DISCARD: int
MAX_DEPTH: int
MAX_WORKERS: int

def engine_info() -> Dict[str, Any]: ...

class Engine:
    """The asynchronous I/O engine of an adapter."""
    kind: str
    depth: int
    closed: bool
    def __init__(self, kind: Optional[str] = ..., depth: SupportsIndex = ...,
                 workers: Optional[SupportsIndex] = ...) -> None: ...
    @property
    def inflight(self) -> int: ...
    @property
    def injected(self) -> int: ...
    def close(self) -> None: ...
    def inject(self, result: int, count: SupportsIndex = ..., op: Optional[str] = ...,
               skip: SupportsIndex = ...) -> None: ...
    def settle(self, dp: DataPath) -> None: ...
    def submit(self, dp: DataPath, op: int, lba: SupportsIndex = ...,
               nblocks: Optional[SupportsIndex] = ..., buffer: Any = ...,
               mode: int = ...) -> Union[Any, "Future[Any]", "asyncio.Future[Any]"]: ...
    def listio(self, dp: DataPath, ops: Any, lbas: Any, nblocks: Any, buffer: Any,
               offsets: Any = ..., lat_ns: Optional[npt.NDArray[np.int64]] = ...,
               qd: SupportsIndex = ...) -> Tuple[npt.NDArray[np.int64],
                                                 npt.NDArray[np.int32]]: ...
    def raw_listio(self, fd: SupportsIndex, ops: Any, offsets: Any, nbytes: SupportsIndex,
                   buffer: Any, buf_offsets: Any = ..., qd: SupportsIndex = ...,
                   lat_ns: Optional[npt.NDArray[np.int64]] = ...) -> int: ...
