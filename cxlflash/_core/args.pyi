from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import CxlFlashError

ArgumentError: type[CxlFlashError]

def einval(message: str) -> CxlFlashError: ...

def uint64_array(values: Any, name: str = ...) -> npt.NDArray[np.uint64]: ...
def integer(value: Any, name: str) -> int: ...
