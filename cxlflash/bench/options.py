"""What a run is asked to do: its options, and the error a bad one raises."""
from dataclasses import dataclass
from typing import Optional

from .._core.tables import MC_CHUNK_SIZE

MAX_THREADS = 256           # --threads beyond this is refused
MAX_CLIENTS = 64            # --clients beyond this is refused


class BenchError(Exception):
    """A bad option or an impossible run: reported in one line."""


@dataclass
class Options:
    workload: str = "matrix"          # matrix | io | arkdb | resize-storm
    target: str = "memory"            # memory, a file path or a block device
    size: int = 1 << 30               # LUN size in bytes (memory / new file)
    lun: str = "virtual"              # virtual | direct
    vlun_blocks: int = 2 * MC_CHUNK_SIZE
    read_pct: int = 100
    blocks: int = 1                   # blocks per request
    threads: int = 1                  # queue depth: one worker thread each
    pattern: str = "random"           # random | seq
    duration: float = 3.0             # seconds per measured row
    warmup: float = 0.3
    compare_raw: bool = True
    seed: int = 1
    quiet: bool = False
    direct_io: bool = False
    force: bool = False               # may overwrite an existing target
    qd: int = 1                       # requests in flight per thread (the engine)
    fio: bool = True                  # io: add fio's figure where fio is on PATH
    size_given: bool = False          # --size was given (not the default)
    connect: Optional[str] = None     # run as a client of the daemon at this socket
    clients: int = 0                  # N > 0: N client processes at once (bench.clients)
