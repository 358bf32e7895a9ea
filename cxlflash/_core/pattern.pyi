from typing import Any, Optional

import numpy.typing as npt

def fill(buffer: Any, lbas: npt.ArrayLike, seqs: npt.ArrayLike, block_size: int,
         nblocks: int = ..., buf_offsets: Optional[npt.ArrayLike] = ...) -> None: ...
def verify(buffer: Any, first_lba: int, seqs: npt.ArrayLike, block_size: int) -> int: ...
