"""Concurrent ioctls on one adapter (§21).  (tests/test_concurrency.py races
the data path against teardown.)

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import random
import threading

import cxlflash
from cxlflash.driver.lunmgt import MODE_NONE, MODE_PHYSICAL, MODE_VIRTUAL

from .helpers import (
    CHUNK, CHUNK_4K, K4, attach, chunks, ctx, glun, last_lba_4k, release, resize,
    run_threads, udirect, uvirtual, verify)


# -- concurrency (§21) -----------------------------------------------------------


def test_resizes_on_one_context_serialise(embedded):
    a = embedded
    w = a.add_lun(None, size=64 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle

    def hammer(seed):
        rng = random.Random(seed)
        for _ in range(400):
            n = rng.randrange(0, 20)
            rs = resize(d, cid, h, n * CHUNK_4K)
            assert rs.last_lba == last_lba_4k(n)

    run_threads(lambda: hammer(1), lambda: hammer(2))
    mine = chunks(a, cid, h)
    assert len(set(mine)) == len(mine)
    assert g.allocator.allocated_count() == len(mine)
    assert g.allocator.space() == 64 - len(mine)
    assert verify(d, cid, h).last_lba == last_lba_4k(len(mine))
    assert all(g.allocator.clone_count(x) == 0 for x in mine)


def test_racing_first_opens_in_different_modes(embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    ca, cb = attach(d).context_id, attach(d).context_id
    wins = {"direct": 0, "virtual": 0}
    for i in range(50):
        barrier = threading.Barrier(2)
        res = {}

        def go(name, fn):
            barrier.wait()
            try:
                res[name] = ("ok", fn())
            except cxlflash.CxlFlashError as e:
                res[name] = ("err", e.errno)

        first = [lambda: go("direct", lambda: udirect(d, ca).rsrc_handle),
                 lambda: go("virtual", lambda: uvirtual(d, cb, CHUNK_4K).rsrc_handle)]
        if i % 2:
            first.reverse()
        run_threads(*first)
        oks = [k for k, v in res.items() if v[0] == "ok"]
        assert len(oks) == 1, res
        loser = "virtual" if oks[0] == "direct" else "direct"
        assert res[loser] == ("err", errno.EINVAL)
        wins[oks[0]] += 1
        assert g.users == 1
        assert g.mode == (MODE_PHYSICAL if oks[0] == "direct" else MODE_VIRTUAL)
        if oks[0] == "direct":
            release(d, ca, res["direct"][1])
        else:
            release(d, cb, res["virtual"][1])
        assert (g.mode, g.users, g.allocator) == (MODE_NONE, 0, None)
    assert ctx(a, ca).table.rht_out == ctx(a, cb).table.rht_out == 0


def test_concurrent_grows_never_overcommit(embedded):
    a = embedded
    total = 300
    w = a.add_lun(None, size=total * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cids = [attach(d).context_id for _ in range(6)]
    hs = [uvirtual(d, c, 0).rsrc_handle for c in cids]

    def grower(i):
        rng = random.Random(i)
        n = 0
        while True:
            want = n + rng.randrange(1, 8)
            try:
                rs = resize(d, cids[i], hs[i], want * CHUNK_4K)
            except cxlflash.CxlFlashError as e:
                assert e.errno == errno.ENOSPC
                return
            got = (rs.last_lba + 1) // CHUNK_4K
            assert n < got <= want
            n = got

    run_threads(*[(lambda i=i: grower(i)) for i in range(6)])
    every = [x for c, h in zip(cids, hs) for x in chunks(a, c, h)]
    assert len(every) == total and len(set(every)) == total
    assert g.allocator.space() == 0 and g.allocator.allocated_count() == total
