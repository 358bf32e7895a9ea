"""§22.1: the checks every DK_* ioctl makes before its handler (internal LUN,
command number, superpipe mode, reset wait, adapter state, copy-in,
header), in the kernel's order, and the copy-out.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import ctypes
import errno
import os

import pytest

import cxlflash
from cxlflash import CxlFlashError, uapi
from cxlflash.driver.lunmgt import MODE_NONE, MODE_PHYSICAL

from .helpers import (
    ALL_DK, ATTACH, BAD_NUMBERS, BLK, Bg, CH, CHILD, CLONE, DETACH, DIRECT, DISABLE,
    ENABLE, MANAGE, NAMES, RECOVER, RELEASE, RESIZE, VERIFY, VIRTUAL, _open_fds,
    add_disk, attach, attach_arg, cid_of, detach, detach_arg, disk_glun, fails,
    find_ctx, last_lba, manage_arg, release, release_arg, resize, resize_arg,
    signal_until_done, udirect, udirect_arg, uvirtual, uvirtual_arg, valid_args,
    verify_arg)


# -- §22.1 Common (all DK_* ioctls) ----------------------------------------------


@pytest.mark.parametrize("req", [RELEASE, VIRTUAL, RESIZE, CLONE], ids=NAMES.get)
def test_common_internal_lun_mode_einval(embedded, req):
    a = embedded
    d = add_disk(a)
    cid, h, args = valid_args(a, d)
    a.lun_mode = 1
    arg = args[req]
    if req == CLONE:
        fails(d, CLONE, arg, errno.EINVAL, CHILD)
    else:
        fails(d, req, arg, errno.EINVAL)


def test_common_internal_lun_mode_physical_access_still_works(embedded):
    a = embedded
    d = add_disk(a)
    a.lun_mode = 1
    cid = cid_of(d)
    h = udirect(d, cid).rsrc_handle
    # Even RELEASE is refused: a direct handle goes away through DETACH.
    fails(d, RELEASE, release_arg(cid, h),
          errno.EINVAL)
    assert disk_glun(d).mode == MODE_PHYSICAL
    detach(d, cid)
    assert disk_glun(d).mode == MODE_NONE and disk_glun(d).users == 0


def test_common_internal_lun_mode_before_failterm(adapter):
    # Dispatch order (§3): the internal-LUN check (EINVAL) precedes the
    # adapter state check (ENODEV).
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    a.lun_mode = 1
    a.fail()
    fails(d, VIRTUAL, uvirtual_arg(cid), errno.EINVAL)
    fails(d, DIRECT, udirect_arg(cid), errno.ENODEV)


@pytest.mark.parametrize("name", sorted(BAD_NUMBERS))
def test_common_command_number_not_one_of_ten_einval(embedded, name):
    a = embedded
    d = add_disk(a)
    fails(d, BAD_NUMBERS[name], attach_arg(), errno.EINVAL)
    assert a.driver.ctx_tbl[0] is None


def test_common_command_number_before_state_and_copy_in(adapter, make_adapter):
    a = adapter
    d = add_disk(a)
    a.fail()
    fails(d, BAD_NUMBERS["unknown_nr"], bytearray(4), errno.EINVAL)
    a2 = make_adapter()
    try:
        # Not waiting while RESET: the number is checked before the state.
        w = a2.add_lun(None, size=65536 * BLK, block_size=BLK)
        d2 = a2.open_disk(w)
        a2.begin_reset()
        t = Bg(lambda: cxlflash.ioctl(d2, BAD_NUMBERS["unknown_nr"],
                                      attach_arg(flags=0)))
        t.join(1.0)
        assert not t.is_alive() and t.errno == errno.EINVAL
        a2.end_reset()
    finally:
        a2.close()


@pytest.mark.parametrize("req", [r for r in ALL_DK if r != MANAGE], ids=NAMES.get)
def test_common_sdev_not_in_superpipe_mode_einval(embedded, req):
    a = embedded
    d = add_disk(a)
    _, _, args = valid_args(a, d)
    plain = add_disk(a, superpipe=False)
    if req == CLONE:
        fails(plain, CLONE, args[CLONE], errno.EINVAL, CHILD)
    else:
        fails(plain, req, args[req], errno.EINVAL)


def test_common_manage_lun_needs_no_superpipe_then_attach_works(make_adapter):
    a = make_adapter()
    d = add_disk(a, superpipe=False)
    fails(d, ATTACH, attach_arg(), errno.EINVAL)
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
    attach(d)


def test_common_no_llun_before_failterm_and_reset(make_adapter):
    a = make_adapter()
    d = add_disk(a, superpipe=False)
    a.fail()
    fails(d, ATTACH, attach_arg(), errno.EINVAL)
    a2 = make_adapter()
    d2 = add_disk(a2, superpipe=False)
    a2.begin_reset()
    t = Bg(lambda: cxlflash.ioctl(d2, ATTACH, attach_arg()))
    t.join(1.0)
    assert not t.is_alive() and t.errno == errno.EINVAL   # no wait for RESET
    a2.end_reset()


def test_common_reset_wait_interrupted_eintr(embedded):
    # ERESTARTSYS: user space sees EINTR.
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    a.begin_reset()
    arg = uvirtual_arg(cid, CH)
    before = bytes(arg)
    t = Bg(lambda: cxlflash.ioctl(d, VIRTUAL, arg))
    t.join(0.1)
    assert t.is_alive(), "the ioctl did not wait for the RESET to end"
    signal_until_done(a, t)
    assert isinstance(t.exc, CxlFlashError) and t.errno == errno.EINTR
    assert bytes(arg) == before
    a.end_reset()
    assert disk_glun(d).mode == MODE_NONE


def test_common_reset_wait_then_proceeds(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    a.begin_reset()
    t1 = Bg(lambda: attach(d))
    t2 = Bg(lambda: resize(d, cid, h, 2 * CH))
    t1.join(0.1)
    assert t1.is_alive() and t2.is_alive()
    a.end_reset()
    t1.join(5)
    t2.join(5)
    assert t1.exc is None and t2.exc is None
    assert t2.result.last_lba == 2 * CH - 1     # the context in error is resizable


def test_common_reset_wait_before_copy_in(adapter):
    # The state check precedes the copy-in: a bad buffer still waits.
    a = adapter
    d = add_disk(a)
    a.begin_reset()
    t = Bg(lambda: cxlflash.ioctl(d, ATTACH, bytearray(10)))
    t.join(0.1)
    assert t.is_alive()
    a.end_reset()
    t.join(5)
    assert t.errno == errno.EFAULT


def test_common_manage_lun_does_not_wait_for_reset(adapter):
    a = adapter
    d = add_disk(a)
    a.begin_reset()
    t = Bg(lambda: cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE)))
    t.join(1.0)
    assert not t.is_alive() and t.exc is None
    a.end_reset()


@pytest.mark.parametrize("req", [ATTACH, DIRECT, VIRTUAL, VERIFY, RECOVER, CLONE],
                         ids=NAMES.get)
def test_common_failterm_enodev(embedded, req):
    a = embedded
    d = add_disk(a)
    _, _, args = valid_args(a, d)
    a.fail()
    if req == CLONE:
        fails(d, CLONE, args[CLONE], errno.ENODEV, CHILD)
    else:
        fails(d, req, args[req], errno.ENODEV)


def test_common_failterm_resize_release_detach_manage_lun_proceed(embedded):
    a = embedded
    d = add_disk(a)
    cid, h, args = valid_args(a, d)
    h1 = uvirtual(d, cid, CH).rsrc_handle
    a.fail()
    cxlflash.ioctl(d, RESIZE, args[RESIZE])
    assert args[RESIZE].last_lba == 2 * CH - 1
    release(d, cid, h1)
    detach(d, cid)
    assert find_ctx(a, cid) is None
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))


def test_common_failterm_before_copy_in(adapter):
    a = adapter
    d = add_disk(a)
    a.fail()
    fails(d, ATTACH, bytearray(10), errno.ENODEV)
    # ... but for the FAILTERM exceptions the copy-in runs.
    fails(d, DETACH, bytearray(10), errno.EFAULT)


@pytest.mark.parametrize("req", ALL_DK, ids=NAMES.get)
@pytest.mark.parametrize("bad", ["short", "not_a_buffer", "none"])
def test_common_copy_in_fault_efault(adapter, req, bad):
    a = adapter
    d = add_disk(a)
    size = ctypes.sizeof(uapi.DK_IOCTLS[req])
    arg = {"short": bytearray(size - 1), "not_a_buffer": 12345, "none": None}[bad]
    fails(d, req, arg, errno.EFAULT)


@pytest.mark.parametrize("req", ALL_DK, ids=NAMES.get)
def test_common_version_nonzero_einval(embedded, req):
    a = embedded
    d = add_disk(a)
    _, _, args = valid_args(a, d)
    arg = args[req]
    arg.hdr.version = 1
    if req == CLONE:
        fails(d, CLONE, arg, errno.EINVAL, CHILD)
    else:
        fails(d, req, arg, errno.EINVAL)


@pytest.mark.parametrize("field", ["rsvd0", "rsvd1", "rsvd2", "return_flags"])
@pytest.mark.parametrize("req", ALL_DK, ids=NAMES.get)
def test_common_reserved_or_return_flags_nonzero_einval(embedded, req, field):
    a = embedded
    d = add_disk(a)
    _, _, args = valid_args(a, d)
    arg = args[req]
    if field == "return_flags":
        arg.hdr.return_flags = uapi.DK_CXLFLASH_ALL_PORTS_ACTIVE
    else:
        arg.hdr.rsvd[int(field[-1])] = 1
    if req == CLONE:
        fails(d, CLONE, arg, errno.EINVAL, CHILD)
    else:
        fails(d, req, arg, errno.EINVAL)


def test_common_reserved_areas_and_flags_not_checked(adapter):
    a = adapter
    d = add_disk(a)
    arg = attach_arg(flags=os.O_RDWR | (1 << 40))
    arg.reserved[3] = 7
    cxlflash.ioctl(d, ATTACH, arg)
    _open_fds.add(arg.adap_fd)


def test_common_header_checks_before_handler(make_adapter):
    # version / reserved EINVAL win over what the handler would return
    # (ENODEV: no free context).
    a = make_adapter(max_contexts=1)
    d = add_disk(a)
    attach(d)
    bad_version = attach_arg()
    bad_version.hdr.version = 1
    fails(d, ATTACH, bad_version, errno.EINVAL)
    bad_rsvd = attach_arg()
    bad_rsvd.hdr.rsvd[2] = 1
    fails(d, ATTACH, bad_rsvd, errno.EINVAL)
    fails(d, ATTACH, attach_arg(), errno.ENODEV)


def test_common_copy_in_before_version(adapter):
    a = adapter
    d = add_disk(a)
    raw = bytearray(bytes(attach_arg()))
    raw[0] = 1                                  # version 1 ...
    fails(d, ATTACH, raw[:100], errno.EFAULT)   # ... in a short buffer
    fails(d, ATTACH, raw, errno.EINVAL)


def test_common_copy_out_fault_efault_operation_took_effect(embedded):
    a = embedded
    d = add_disk(a)
    # ATTACH: the context exists although the caller never saw its id.
    fails(d, ATTACH, bytes(attach_arg()), errno.EFAULT)
    assert a.driver.ctx_tbl[0] is not None
    _open_fds.add(a.driver.ctx_tbl[0].file.user_fd)
    cid = attach(d).context_id
    assert cid & 0xFFFFFFFF == 1
    # USER_VIRTUAL: handle 0 is open with one chunk.
    fails(d, VIRTUAL, bytes(uvirtual_arg(cid, CH)),
          errno.EFAULT)
    assert last_lba(d, cid, 0) == CH - 1
    # VLUN_RESIZE: the new size is in effect.
    fails(d, RESIZE, bytes(resize_arg(cid, 0, 3 * CH)), errno.EFAULT)
    assert last_lba(d, cid, 0) == 3 * CH - 1
    # RELEASE: the handle is gone.
    fails(d, RELEASE, bytes(release_arg(cid, 0)),
          errno.EFAULT)
    fails(d, VERIFY, verify_arg(cid, 0), errno.EINVAL)
    # DETACH: the context is gone.
    fails(d, DETACH, bytes(detach_arg(cid)), errno.EFAULT)
    assert find_ctx(a, cid) is None
    # MANAGE_LUN: superpipe mode was disabled.
    fails(d, MANAGE, bytes(manage_arg(d.wwid, DISABLE)), errno.EFAULT)
    assert d.sdev.llun is None
