from .errors import CxlFlashError

ArgumentError: type[CxlFlashError]

def einval(message: str) -> CxlFlashError: ...
