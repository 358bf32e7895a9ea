from typing import Any, Optional, SupportsIndex

import numpy.typing as npt

def fill(buffer: Any, lbas: npt.ArrayLike, seqs: npt.ArrayLike, block_size: SupportsIndex,
         nblocks: SupportsIndex = ..., buf_offsets: Optional[npt.ArrayLike] = ...) -> None: ...
def verify(buffer: Any, first_lba: SupportsIndex, seqs: npt.ArrayLike,
           block_size: SupportsIndex) -> int: ...
