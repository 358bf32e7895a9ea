"""The object-API fixtures the API tests share: an in-memory adapter, a
1 GiB LUN's disk (4 chunks), a context on it, a 100-block vLUN."""
import pytest

import cxlflash

from block_pattern import GIB


@pytest.fixture
def adapter():
    with cxlflash.Adapter() as a:
        yield a


@pytest.fixture
def disk(adapter):
    with adapter.open_disk(adapter.create_lun(GIB)) as d:     # 4 chunks
        yield d


@pytest.fixture
def ctx(disk):
    with disk.attach() as c:
        yield c


@pytest.fixture
def vlun(ctx):
    with ctx.create_virtual(100) as v:
        yield v
