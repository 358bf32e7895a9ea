"""VERIFY (§15): capacity refresh, sense parsing, and every failure of
§22.2 VERIFY.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import os
import threading

import pytest

import cxlflash

from scsi_sense import desc_sense, fixed_sense

from .helpers import (
    Bg, CH, CHUNK, CHUNK_4K, HINT_SENSE, K4, NCHUNKS, STRANGER, U64, VERIFY, add_disk,
    attach, call, cid_of, disk_glun, fails, glun, last_lba, last_lba_4k, recover,
    release, resize, udirect, uvirtual, verify, verify_arg)


# -- VERIFY (§15) ----------------------------------------------------------------


def test_verify_capacity_refresh_fixed_and_descriptor(adapter, tmp_path):
    a = adapter
    path = tmp_path / "lun.img"
    w = a.add_lun(str(path), size=256 * K4)
    d = a.open_disk(w)
    at = attach(d)
    cid = at.context_id
    assert at.last_lba == 255
    h = udirect(d, cid).rsrc_handle
    assert verify(d, cid, h).last_lba == 255
    os.truncate(path, 512 * K4)
    assert verify(d, cid, h).last_lba == 255              # no sense: no re-read
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A, 0x09)).last_lba == 511
    assert attach(d).last_lba == 511
    os.truncate(path, 1024 * K4)
    assert verify(d, cid, h, desc_sense(0x6, 0x29)).last_lba == 1023
    os.truncate(path, 2048 * K4)
    # Deferred error codes 0x71 / 0x73 are parsed the same way.
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A, code=0x71)).last_lba == 2047
    os.truncate(path, 4096 * K4)
    assert verify(d, cid, h, desc_sense(0x6, 0x2A, code=0x73)).last_lba == 4095


def test_verify_sense_parsing(adapter, tmp_path):
    a = adapter
    path = tmp_path / "lun.img"
    w = a.add_lun(str(path), size=256 * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = udirect(d, cid).rsrc_handle
    os.truncate(path, 512 * K4)
    # Fixed format with additional length < 5: ASC is not seen -> UA with ASC 0 -> EIO.
    fails(d, VERIFY, verify_arg(cid, h, fixed_sense(0x6, 0x2A, addl=4)), errno.EIO)
    # Fixed-format bytes under a descriptor code: the key is byte 1 (0) -> OK, no refresh.
    s = fixed_sense(0x6, 0x2A)
    s[0] = 0x72
    assert verify(d, cid, h, s).last_lba == 255
    # Descriptor bytes under a fixed code: key = byte 2 & 0xF = 0xA -> EIO.
    s = desc_sense(0x6, 0x2A)
    s[0] = 0x70
    fails(d, VERIFY, verify_arg(cid, h, s), errno.EIO)
    # Response code not 0x70-0x7F -> EINVAL.
    for code in (0x00, 0x60, 0x6F):
        s = fixed_sense(0x6, 0x2A, code=code)
        fails(d, VERIFY, verify_arg(cid, h, s), errno.EINVAL)
    # Keys NO SENSE / RECOVERED / NOT READY: nothing, OK.
    for key in (0x0, 0x1, 0x2):
        assert verify(d, cid, h, fixed_sense(key, 0x2A)).last_lba == 255
    # UNIT ATTENTION: 0x3F is OK (rescan), any other ASC -> EIO.
    assert verify(d, cid, h, fixed_sense(0x6, 0x3F)).last_lba == 255
    fails(d, VERIFY, verify_arg(cid, h, fixed_sense(0x6, 0x28)), errno.EIO)
    # Other keys -> EIO.
    for key in (0x3, 0x4, 0x5, 0xB):
        fails(d, VERIFY, verify_arg(cid, h, fixed_sense(key, 0x2A)), errno.EIO)
    # Other hint bits are ignored; without HINT_SENSE no parsing at all.
    vf = verify_arg(cid, h)
    vf.hint = 0x7FFFFFFFFFFFFFFF
    vf.sense_data[:] = bytes(18)
    assert call(d, VERIFY, vf).last_lba == 255
    # The context is usable afterwards (not left unavail).
    assert verify(d, cid, h, fixed_sense(0x6, 0x29)).last_lba == 511


def test_verify_virtual_and_live_allocator_not_resized(embedded, tmp_path):
    a = embedded
    path = tmp_path / "lun.img"
    w = a.add_lun(str(path), size=2 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, CHUNK_4K).rsrc_handle
    assert verify(d, cid, h).last_lba == CHUNK_4K - 1
    os.truncate(path, 4 * CHUNK * K4)
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A)).last_lba == CHUNK_4K - 1
    assert glun(a, w).max_lba == 4 * CHUNK - 1
    # The live allocator still has 2 chunks in all.
    assert resize(d, cid, h, 4 * CHUNK_4K).last_lba == last_lba_4k(2)
    release(d, cid, h)
    # Rebuilt on the next virtual open: 4 chunks.
    assert uvirtual(d, cid, 4 * CHUNK_4K).last_lba == last_lba_4k(4)


def test_verify_empty_vlun_and_invalid_handles(adapter):
    a = adapter
    w = a.add_lun(None, size=2 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    assert verify(d, cid, h).last_lba == U64
    fails(d, VERIFY, verify_arg(cid, 7), errno.EINVAL)
    fails(d, VERIFY, verify_arg(cid, 256), errno.EINVAL)


# -- §22.2 VERIFY ----------------------------------------------------------------


def test_verify_lookup_fails_einval_error_contexts_not_found(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    d2 = add_disk(a)
    fails(d, VERIFY, verify_arg(cid ^ (1 << 32), h), errno.EINVAL)
    fails(d2, VERIFY, verify_arg(cid, h), errno.EINVAL)
    fails(d, VERIFY, verify_arg(cid, h), errno.EINVAL, STRANGER)
    a.reset()
    fails(d, VERIFY, verify_arg(cid, h), errno.EINVAL)
    new = recover(d, cid).context_id
    assert last_lba(d, new, h) == CH - 1


def test_verify_invalid_handle_einval(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    attach(d2, reuse=cid)
    udirect(d, cid)
    h1 = udirect(d2, cid).rsrc_handle
    fails(d, VERIFY, verify_arg(cid, 256), errno.EINVAL)
    fails(d, VERIFY, verify_arg(cid, h1), errno.EINVAL)
    fails(d, VERIFY, verify_arg(cid, 4), errno.EINVAL)
    assert last_lba(d, cid, 0) == NCHUNKS * 65536 - 1


@pytest.mark.parametrize("byte0", [0x00, 0x60, 0x0F, 0xF0 & 0x8F])
def test_verify_hint_sense_bad_response_code_einval(adapter, byte0):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = udirect(d, cid).rsrc_handle
    sense = bytearray(fixed_sense(0x6, 0x29))
    sense[0] = byte0
    fails(d, VERIFY, verify_arg(cid, h, hint=HINT_SENSE, sense=sense), errno.EINVAL)


def test_verify_invalid_handle_before_sense_parse(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    udirect(d, cid)
    a.inject_fault("read_capacity")
    fails(d, VERIFY, verify_arg(cid, 3, hint=HINT_SENSE, sense=fixed_sense(0x6, 0x29)),
          errno.EINVAL)
    assert a.driver.afu.faults.pending() == {"read_capacity": 1}


@pytest.mark.parametrize("asc", [0x29, 0x2A])
@pytest.mark.parametrize("fmt", [fixed_sense, desc_sense], ids=["fixed", "descriptor"])
def test_verify_unit_attention_read_capacity_fails_enodev(adapter, asc, fmt):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = udirect(d, cid).rsrc_handle
    a.inject_fault("read_capacity")
    fails(d, VERIFY, verify_arg(cid, h, hint=HINT_SENSE, sense=fmt(0x6, asc)), errno.ENODEV)
    # ... and the context is usable again afterwards
    s = verify_arg(cid, h, hint=HINT_SENSE, sense=fmt(0x6, asc))
    cxlflash.ioctl(d, VERIFY, s)
    assert s.last_lba == NCHUNKS * 65536 - 1


@pytest.mark.parametrize("sense", [fixed_sense(0x6, 0x28), desc_sense(0x6, 0x04),
                                   fixed_sense(0x6, 0x29, addl=4)],
                         ids=["fixed_asc28", "desc_asc04", "fixed_short_addl_len"])
def test_verify_unit_attention_other_asc_eio(adapter, sense):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = udirect(d, cid).rsrc_handle
    fails(d, VERIFY, verify_arg(cid, h, hint=HINT_SENSE, sense=sense), errno.EIO)


@pytest.mark.parametrize("key", [0x3, 0x4, 0x5, 0x7, 0xB, 0xE])
def test_verify_sense_key_not_handled_eio(adapter, key):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    fails(d, VERIFY, verify_arg(cid, h, hint=HINT_SENSE, sense=fixed_sense(key)), errno.EIO)


@pytest.mark.parametrize("sense", [fixed_sense(0x0), fixed_sense(0x1), desc_sense(0x2),
                                   fixed_sense(0x6, 0x3F)],
                         ids=["no_sense", "recovered", "not_ready", "ua_luns_changed"])
def test_verify_sense_accepted(adapter, sense):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    s = verify_arg(cid, h, hint=HINT_SENSE | 0x1234, sense=sense)
    cxlflash.ioctl(d, VERIFY, s)
    assert s.last_lba == CH - 1


def test_verify_concurrent_ioctl_serialises_decision_26(embedded):
    # Spec: while VERIFY has the context `unavail`, another ioctl on it gets
    # EINVAL.  Decision 26: it waits, then succeeds.
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    g = disk_glun(d)
    inside, go = threading.Event(), threading.Event()
    real = g.read_capacity

    def slow_read_capacity():
        inside.set()
        assert go.wait(5)
        real()

    g.read_capacity = slow_read_capacity
    try:
        v = verify_arg(cid, h, hint=HINT_SENSE, sense=fixed_sense(0x6, 0x2A))
        t1 = Bg(lambda: cxlflash.ioctl(d, VERIFY, v))
        assert inside.wait(5)
        t2 = Bg(lambda: resize(d, cid, h, 2 * CH))
        t3 = Bg(lambda: last_lba(d, cid, h))
        t2.join(0.2)
        assert t2.is_alive() and t3.is_alive(), "did not wait for the VERIFY"
        go.set()
        for t in (t1, t2, t3):
            t.join(5)
            assert t.exc is None, t.exc
    finally:
        g.read_capacity = real
    assert t2.result.last_lba == 2 * CH - 1 and v.last_lba in (CH - 1, 2 * CH - 1)
