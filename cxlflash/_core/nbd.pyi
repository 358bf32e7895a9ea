from typing import Any, Optional

MAX_PAYLOAD: int
HOLE_READ_MIN: int

class NbdExport:
    lun: Any
    block_size: int
    can_punch: bool
    seek_holes: bool
    def __init__(self, lun: Any) -> None: ...

class NbdConnection:
    fd: int
    export: NbdExport
    size: int
    structured: bool
    meta_id: int
    requests: int
    errors: int
    def __init__(self, fd: int, export: NbdExport, size: int, structured: bool,
                 meta_id: int) -> None: ...
    @property
    def why(self) -> Optional[str]: ...
    @property
    def ended(self) -> bool: ...
    def serve(self) -> None: ...
    def abort(self) -> None: ...
