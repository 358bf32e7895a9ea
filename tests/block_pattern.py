"""Test data for the Pythonic API tests: blocks that name themselves."""
import numpy as np

CHUNK = 1 << 16                 # blocks per chunk
BS = 4096
GIB = 1 << 30


def pattern(lba, nblocks, seed=0, bs=BS):
    """Blocks whose every 8-byte word names the block and the seed."""
    words = bs // 8
    lbas = np.arange(lba, lba + nblocks, dtype=np.uint64)
    return np.repeat(lbas * np.uint64(1000) + np.uint64(seed), words).view(np.uint8)
