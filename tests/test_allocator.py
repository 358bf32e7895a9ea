"""ChunkAllocator against the kernel's allocator (spec §12, Appendix A).

The golden sequences pin the exact chunk numbers the kernel hands out; the
rule-based test runs random operation sequences against ``Model``, a direct
pure-Python transcription of spec §12 (``cxlflash.reference``, the package's
executable spec, also the baseline of the benchmarks' allocation rows).
"""
import errno
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule)

from cxlflash import reference
from cxlflash._core.allocator import ChunkAllocator


# -- the reference model (spec §12): cxlflash.reference.ChunkAllocator ------

Model = reference.ChunkAllocator


def assert_same(alloc, model):
    assert alloc.free_count == model.free_aun_cnt == alloc.space()
    assert alloc.cursor == model.free_curr_idx
    assert alloc.allocated_count() == model.total_chunks - model.free_aun_cnt
    for aun in range(model.total_chunks):
        assert alloc.is_allocated(aun) == (not model.is_free(aun)), aun
        assert alloc.clone_count(aun) == model.clone_map[aun], aun


def snapshot(alloc):
    return (alloc.free_count, alloc.cursor,
            [alloc.is_allocated(a) for a in range(alloc.total_chunks)],
            [alloc.clone_count(a) for a in range(alloc.total_chunks)])


# -- construction and refusals -----------------------------------------------

@pytest.mark.parametrize("total", [0, -1, -(2 ** 40)])
def test_no_whole_chunk_is_refused(total):
    with pytest.raises(ValueError):
        ChunkAllocator(total)


@pytest.mark.parametrize("total,words", [(1, 1), (63, 1), (64, 1), (65, 2),
                                         (128, 2), (1000, 16)])
def test_geometry(total, words):
    a = ChunkAllocator(total)
    assert a.total_chunks == total
    assert a.words == words
    assert a.free_count == a.space() == total
    assert a.cursor == 0
    assert a.allocated_count() == 0
    assert not any(a.is_allocated(i) for i in range(total))


def test_out_of_range_chunks_raise_index_error():
    a = ChunkAllocator(100)
    a.alloc_many(10)
    before = snapshot(a)
    for bad in (-1, 100, 10 ** 6):
        for op in (a.free, a.clone, a.clone_count, a.is_allocated):
            with pytest.raises(IndexError):
                op(bad)
        # Bulk: the valid entries before the bad one are not applied either.
        with pytest.raises(IndexError):
            a.free_many([0, 1, bad])
        with pytest.raises(IndexError):
            a.clone_many([0, 1, bad])
    assert snapshot(a) == before


def test_negative_count_is_refused():
    a = ChunkAllocator(10)
    with pytest.raises(ValueError):
        a.alloc_many(-1)
    with pytest.raises(ValueError):
        a.alloc_many(-1, partial=True)
    assert a.free_count == 10


def test_full_allocator_raises_enospc():
    a = ChunkAllocator(3)
    assert [a.alloc() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError) as ei:
        a.alloc()
    assert ei.value.errno == errno.ENOSPC
    assert a.free_count == 0


def test_free_of_a_free_chunk_fails_without_change():
    a = ChunkAllocator(10)
    before = snapshot(a)
    assert a.free(3) is False
    assert snapshot(a) == before
    a.alloc()
    assert a.free(0) is True
    assert a.free(0) is False
    assert a.free_count == 10


def test_clone_of_a_free_chunk_fails():
    a = ChunkAllocator(10)
    assert a.clone(0) is False
    assert a.clone_count(0) == 0
    assert not a.is_allocated(0)


# -- golden sequences ----------------------------------------------------------

def test_fresh_allocations_are_in_order():
    a = ChunkAllocator(300)
    assert [a.alloc() for _ in range(300)] == list(range(300))
    assert a.free_count == 0


def test_fresh_alloc_many_is_in_order():
    a = ChunkAllocator(300)
    got = a.alloc_many(200)
    assert got.dtype == np.int64
    assert got.tolist() == list(range(200))
    assert a.alloc_many(100).tolist() == list(range(200, 300))


def test_appendix_a_allocator_sequence():
    # 1,000,000 free chunks, as in Appendix A.
    a = ChunkAllocator(1_000_000)
    h0 = [a.alloc()]                              # RESIZE h0 to 100 -> 1 chunk
    assert h0 == [0]
    h0 += [a.alloc(), a.alloc()]                  # RESIZE to 131073 -> 3 chunks
    assert h0 == [0, 1, 2]
    h1 = [a.alloc()]                              # second handle, 1 chunk
    assert h1 == [3]
    # RESIZE h0 to 65536: the last chunk first.
    freed = h0[:0:-1]
    assert freed == [2, 1]
    assert a.free_many(freed) == 0
    assert a.cursor == 0                          # still in word 0
    assert a.alloc() == 1                         # lowest free bit of word 0
    assert a.alloc() == 2
    assert a.alloc() == 4
    assert a.free_count == 1_000_000 - 5


def test_lowest_bit_of_the_cursor_word_is_reused():
    a = ChunkAllocator(200)
    a.alloc_many(70)                              # 0..69, cursor in word 1
    assert a.cursor == 1
    assert a.free(65) and a.free(5)
    # 65 is in the cursor word (reused at once); 5 waits for a wrap.
    assert a.alloc() == 65
    assert a.alloc() == 70
    assert not a.is_allocated(5)


def test_cursor_moves_past_a_word_only_when_bit_63_is_taken():
    a = ChunkAllocator(256)
    for i in range(63):
        assert a.alloc() == i
        assert a.cursor == 0
    assert a.alloc() == 63
    assert a.cursor == 1
    # A bit 63 taken before lower bits of the same word also moves it.
    b = ChunkAllocator(256)
    b.alloc_many(64)                              # cursor 1
    got = b.alloc_many(64)                        # all of word 1
    assert got.tolist() == list(range(64, 128))
    assert b.cursor == 2
    assert b.free(100)                            # frees do not move it
    assert b.cursor == 2
    assert b.alloc() == 128                       # word 2 first, not 100
    assert b.cursor == 2


def test_cursor_after_wrap_and_bit_63():
    a = ChunkAllocator(192)
    a.alloc_many(64)                              # word 0 full, cursor 1
    a.alloc_many(64)                              # word 1 full, cursor 2
    assert a.cursor == 2
    # Free word 0 except bit 63, wrap into it: the scan takes bit 0 first.
    a.free_many(range(0, 63))
    a.alloc_many(64)                              # word 2 full, cursor 3 (= words)
    assert a.cursor == 3
    assert a.alloc() == 0                         # wrap: lowest free bit of word 0
    assert a.cursor == 0
    # Free 63 too: bits 1..62 stay in word 0, then bit 63 moves the cursor.
    a.free(63)
    got = a.alloc_many(63)
    assert got.tolist() == list(range(1, 64))
    assert a.cursor == 1


def test_wrap_around_to_word_0():
    a = ChunkAllocator(128)
    a.alloc_many(128)
    assert a.cursor == 2 == a.words               # past the end
    assert a.free(100) and a.free(10)
    # Nothing free at/after the cursor: the scan wraps to word 0.
    assert a.alloc() == 10
    assert a.cursor == 0
    assert a.alloc() == 100
    assert a.cursor == 1


def test_freed_chunk_in_an_earlier_word_waits_for_the_wrap():
    a = ChunkAllocator(192)
    a.alloc_many(130)                             # cursor 2
    a.free(3)
    assert a.alloc_many(62).tolist() == list(range(130, 192))
    assert a.cursor == 3
    assert a.alloc() == 3
    with pytest.raises(OSError):
        a.alloc()


@pytest.mark.parametrize("total", [1, 5, 63, 65, 70, 127, 129, 1000])
def test_tail_bits_are_never_handed_out(total):
    a = ChunkAllocator(total)
    got = [a.alloc() for _ in range(total)]
    assert got == list(range(total))
    with pytest.raises(OSError):
        a.alloc()
    assert a.allocated_count() == total
    # After freeing and wrapping many times, still only real chunks.
    rng = random.Random(total)
    for _ in range(3 * total):
        victim = rng.randrange(total)
        if a.is_allocated(victim):
            assert a.free(victim)
        aun = a.alloc()
        assert 0 <= aun < total
    assert a.alloc_many(a.free_count).max(initial=0) < total
    assert a.free_count == 0


def test_clone_cap_and_free_drops_a_reference_first():
    a = ChunkAllocator(64)
    aun = a.alloc()
    for i in range(255):
        assert a.clone(aun) is True
        assert a.clone_count(aun) == i + 1
    assert a.clone(aun) is False                  # 256 owners at most
    assert a.clone_count(aun) == 255
    free_before = a.free_count
    for i in range(255):
        assert a.free(aun) is True
        assert a.is_allocated(aun)
        assert a.clone_count(aun) == 254 - i
        assert a.free_count == free_before
    assert a.free(aun) is True                    # the last owner
    assert not a.is_allocated(aun)
    assert a.free_count == free_before + 1
    assert a.free(aun) is False


# -- bulk operations -------------------------------------------------------------

def _prepare(seed, total=300):
    """An allocator put through a random alloc/free history (deterministic)."""
    a = ChunkAllocator(total)
    rng = random.Random(seed)
    for _ in range(rng.randrange(50, 600)):
        if rng.random() < 0.55 and a.free_count:
            a.alloc()
        else:
            a.free(rng.randrange(total))
    return a


@pytest.mark.parametrize("seed", range(20))
def test_alloc_many_equals_successive_alloc(seed):
    x, y = _prepare(seed), _prepare(seed)
    assert snapshot(x) == snapshot(y)
    n = random.Random(seed).randrange(0, x.free_count + 1)
    got = x.alloc_many(n)
    assert got.tolist() == [y.alloc() for _ in range(n)]
    assert snapshot(x) == snapshot(y)


def test_alloc_many_refusal_changes_nothing():
    a = _prepare(7)
    before = snapshot(a)
    for n in (a.free_count + 1, a.total_chunks + 1, 2 ** 45):
        with pytest.raises(OSError) as ei:
            a.alloc_many(n)
        assert ei.value.errno == errno.ENOSPC
        assert snapshot(a) == before


def test_alloc_many_partial_takes_what_is_free():
    x, y = _prepare(3), _prepare(3)
    free = x.free_count
    got = x.alloc_many(free + 10, partial=True)
    assert got.tolist() == [y.alloc() for _ in range(free)]
    assert x.free_count == 0
    assert x.alloc_many(5, partial=True).tolist() == []
    assert x.alloc_many(0).tolist() == []
    with pytest.raises(OSError):
        x.alloc_many(1)
    # partial with enough space is the plain call.
    z = ChunkAllocator(10)
    assert z.alloc_many(4, partial=True).tolist() == [0, 1, 2, 3]
    assert z.alloc_many(2 ** 45, partial=True).tolist() == list(range(4, 10))


def test_free_many_frees_in_order_and_counts_failures():
    a = ChunkAllocator(200)
    a.alloc_many(200)
    a.clone(5)
    # 5 loses its clone, then is freed, then fails; 7 is freed; 7 fails.
    assert a.free_many(np.array([5, 7, 5, 5, 7])) == 2
    assert not a.is_allocated(5) and not a.is_allocated(7)
    assert a.free_count == 2
    # The last word (192..199) has no bit 63, so the cursor stays on it;
    # nothing is free there, so the next scans wrap to word 0.
    assert a.cursor == 3
    assert a.free_many([150, 70]) == 0
    assert [a.alloc() for _ in range(4)] == [5, 7, 70, 150]
    assert a.free_many([]) == 0


def test_free_many_equals_successive_free():
    x, y = _prepare(11), _prepare(11)
    rng = random.Random(11)
    auns = [rng.randrange(300) for _ in range(400)]
    failed = x.free_many(auns)
    assert failed == sum(not y.free(aun) for aun in auns)
    assert snapshot(x) == snapshot(y)


def test_clone_many_is_all_or_nothing():
    a = ChunkAllocator(100)
    a.alloc_many(10)
    assert a.clone_many([1, 2, 3]) is True
    before = snapshot(a)
    # A free chunk (50) at the end: the clones of 1, 2, 3 are undone.
    assert a.clone_many([1, 2, 3, 50]) is False
    assert snapshot(a) == before
    # The cap reached in the middle of the batch (duplicates count).
    for _ in range(253):
        a.clone(4)
    assert a.clone_count(4) == 253
    before = snapshot(a)
    assert a.clone_many(np.array([0, 4, 4, 4, 9])) is False
    assert snapshot(a) == before
    assert a.clone_many([0, 4, 4, 9]) is True
    assert a.clone_count(4) == 255 and a.clone_count(0) == 1
    assert a.clone_many([]) is True


# -- property test against the model ------------------------------------------

class AllocatorMachine(RuleBasedStateMachine):
    @initialize(total=st.one_of(st.integers(1, 200), st.sampled_from([64, 128, 129])))
    def setup(self, total):
        self.alloc = ChunkAllocator(total)
        self.model = Model(total)

    def aun(self, data, margin=True):
        lo, hi = (-2, self.model.total_chunks + 1) if margin else (0, self.model.total_chunks - 1)
        return data.draw(st.integers(lo, hi))

    @rule()
    def alloc(self):
        want = self.model.ba_alloc()
        if want is None:
            with pytest.raises(OSError) as ei:
                self.alloc.alloc()
            assert ei.value.errno == errno.ENOSPC
        else:
            assert self.alloc.alloc() == want

    @rule(data=st.data())
    def free(self, data):
        aun = self.aun(data)
        if not self.model.in_range(aun):
            with pytest.raises(IndexError):
                self.alloc.free(aun)
        else:
            assert self.alloc.free(aun) == self.model.ba_free(aun)

    @rule(data=st.data())
    def clone(self, data):
        aun = self.aun(data)
        if not self.model.in_range(aun):
            with pytest.raises(IndexError):
                self.alloc.clone(aun)
        else:
            assert self.alloc.clone(aun) == self.model.ba_clone(aun)

    @rule(n=st.integers(-1, 80), partial=st.booleans())
    def alloc_many(self, n, partial):
        if n < 0:
            with pytest.raises(ValueError):
                self.alloc.alloc_many(n, partial=partial)
            return
        want = self.model.alloc_many(n, partial)
        if want is None:
            with pytest.raises(OSError) as ei:
                self.alloc.alloc_many(n, partial=partial)
            assert ei.value.errno == errno.ENOSPC
        else:
            assert self.alloc.alloc_many(n, partial=partial).tolist() == want

    @rule(data=st.data())
    def free_many(self, data):
        auns = data.draw(st.lists(st.integers(-1, self.model.total_chunks), max_size=40))
        if not all(map(self.model.in_range, auns)):
            with pytest.raises(IndexError):
                self.alloc.free_many(auns)
        else:
            assert self.alloc.free_many(auns) == self.model.free_many(auns)

    @rule(data=st.data())
    def free_allocated(self, data):
        # Frees that hit allocated chunks, so the pool refills.
        used = [a for a in range(self.model.total_chunks) if not self.model.is_free(a)]
        if used:
            auns = data.draw(st.lists(st.sampled_from(used), max_size=60))
            assert self.alloc.free_many(auns) == self.model.free_many(auns)

    @rule(data=st.data())
    def clone_many(self, data):
        auns = data.draw(st.lists(st.integers(-1, self.model.total_chunks), max_size=20))
        if data.draw(st.booleans()) and auns:
            auns = auns * data.draw(st.integers(1, 30))   # towards the 255 cap
        if not all(map(self.model.in_range, auns)):
            with pytest.raises(IndexError):
                self.alloc.clone_many(auns)
        else:
            assert self.alloc.clone_many(auns) == self.model.clone_many(auns)

    @precondition(lambda self: self.model.free_aun_cnt < self.model.total_chunks)
    @rule(data=st.data(), times=st.integers(1, 300))
    def clone_one_many_times(self, data, times):
        used = [a for a in range(self.model.total_chunks) if not self.model.is_free(a)]
        aun = data.draw(st.sampled_from(used))
        for _ in range(times):
            assert self.alloc.clone(aun) == self.model.ba_clone(aun)

    @invariant()
    def same_state(self):
        if hasattr(self, "model"):
            assert_same(self.alloc, self.model)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_model_agrees_with_golden_sequences():
    # The model itself reproduces Appendix A (guards the property test).
    m = Model(1_000)
    assert [m.ba_alloc() for _ in range(4)] == [0, 1, 2, 3]
    m.ba_free(2), m.ba_free(1)
    assert m.ba_alloc() == 1
