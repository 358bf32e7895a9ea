from typing import Any, Optional, SupportsIndex

import numpy as np
import numpy.typing as npt

def raw_io(fd: int, ops: npt.ArrayLike, offsets: npt.ArrayLike, nbytes: SupportsIndex,
           buffer: Any,
           buf_offsets: Optional[npt.ArrayLike] = ...,
           lat_ns: Optional[npt.NDArray[np.int64]] = ...) -> int: ...
