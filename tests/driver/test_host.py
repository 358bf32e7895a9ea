"""§22.3: the host ioctls (HT_CXLFLASH_LUN_PROVISION, HT_CXLFLASH_AFU_DEBUG).

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import ctypes
import errno

import pytest

import cxlflash
from cxlflash import uapi

from .helpers import (
    ATTACH, Bg, CH, DEBUG, NAMES, PROVISION, add_disk, debug_arg, fails, provision_arg)


# -- §22.3 Host ioctls -----------------------------------------------------------
# "open /dev/cxlflash/*: caller lacks CAP_SYS_ADMIN -> EACCES": there is no
# open() of a character device here -- the Adapter object is the open
# device -- so this row has no equivalent and no test.


@pytest.mark.parametrize("req", [uapi.CXL_IOWR(0xBD, uapi.ht_cxlflash_afu_debug),
                                 PROVISION ^ (1 << 16), ATTACH, 0],
                         ids=["nr_0xBD", "wrong_size", "dk_number", "zero"])
def test_ht_command_number_not_one_of_two_einval(adapter, req):
    a = adapter
    d = add_disk(a)
    fails(a, req, provision_arg(3), errno.EINVAL)
    fails(a, req, bytearray(2), errno.EINVAL)        # checked before the copy-in


@pytest.mark.parametrize("req", [PROVISION, DEBUG], ids=NAMES.get)
@pytest.mark.parametrize("bad", ["short", "not_a_buffer"])
def test_ht_copy_in_fault_efault(adapter, req, bad):
    a = adapter
    d = add_disk(a)
    size = ctypes.sizeof(uapi.HT_IOCTLS[req])
    fails(a, req, bytearray(size - 8) if bad == "short" else object(), errno.EFAULT)


@pytest.mark.parametrize("req", [PROVISION, DEBUG], ids=NAMES.get)
def test_ht_version_nonzero_einval(make_adapter, req):
    a = make_adapter(lun_provision=False, afu_debug=False)
    d = add_disk(a)
    arg = provision_arg(3) if req == PROVISION else debug_arg()
    arg.hdr.version = 3
    fails(a, req, arg, errno.EINVAL)                 # before the capability check


@pytest.mark.parametrize("field", ["rsvd0", "rsvd1", "return_flags"])
@pytest.mark.parametrize("req", [PROVISION, DEBUG], ids=NAMES.get)
def test_ht_reserved_or_return_flags_nonzero_einval(adapter, req, field):
    a = adapter
    d = add_disk(a)
    arg = provision_arg(3) if req == PROVISION else debug_arg()
    if field == "return_flags":
        arg.hdr.return_flags = 1
    else:
        arg.hdr.rsvd[int(field[-1])] = 1
    fails(a, req, arg, errno.EINVAL)


def test_ht_no_state_check_and_no_internal_lun_restriction(adapter):
    a = adapter
    d = add_disk(a)
    a.lun_mode = 2
    a.begin_reset()
    t = Bg(lambda: cxlflash.ioctl(a, PROVISION, provision_arg(3)))
    t.join(1.0)
    assert not t.is_alive() and t.exc is None
    a.end_reset(ok=False)
    cxlflash.ioctl(a, PROVISION, provision_arg(3))
    cxlflash.ioctl(a, DEBUG, debug_arg(n=0))


def test_lun_provision_no_capability_eopnotsupp_decision_17(make_adapter):
    a = make_adapter(lun_provision=False)
    d = add_disk(a)
    e = fails(a, PROVISION, provision_arg(3), errno.EOPNOTSUPP)
    assert e.errno != 524
    fails(a, PROVISION, provision_arg(3, port=9), errno.EOPNOTSUPP)   # before the port
    fails(a, PROVISION, provision_arg(77), errno.EOPNOTSUPP)          # and the subcmd


@pytest.mark.parametrize("sub", [1, 2, 3])
def test_lun_provision_port_out_of_range_einval(embedded, sub):
    a = embedded
    d = add_disk(a)
    a.inject_fault("afu_cmd")
    fails(a, PROVISION, provision_arg(sub, port=2, size=CH), errno.EINVAL)
    fails(a, PROVISION, provision_arg(sub, port=0xFFFF, size=CH), errno.EINVAL)
    assert a.driver.afu.faults.pending() == {"afu_cmd": 1}    # no AFU command sent
    cxlflash.ioctl(a, PROVISION, provision_arg(3, port=1))


@pytest.mark.parametrize("sub", [0, 4, 0xFFFF])
def test_lun_provision_unknown_subcmd_einval(adapter, sub):
    a = adapter
    d = add_disk(a)
    fails(a, PROVISION, provision_arg(sub), errno.EINVAL)


@pytest.mark.parametrize("err", [None, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN,
                                 errno.ETIMEDOUT])
def test_lun_provision_afu_command_failed(embedded, err):
    a = embedded
    d = add_disk(a)
    a.inject_fault("afu_cmd", err=err)
    fails(a, PROVISION, provision_arg(1, size=CH), err or errno.EIO)
    assert not a.provisioned


def test_lun_provision_afu_refuses_size_or_lun_id_eio(embedded):
    a = embedded
    d = add_disk(a)
    fails(a, PROVISION, provision_arg(1, size=a.driver.port_capacity + 1), errno.EIO)
    fails(a, PROVISION, provision_arg(1, size=0), errno.EIO)
    fails(a, PROVISION, provision_arg(2, lun_id=0x1234), errno.EIO)
    s = provision_arg(1, size=CH)
    cxlflash.ioctl(a, PROVISION, s)
    assert len(a.provisioned) == 1 and s.lun_id
    cxlflash.ioctl(a, PROVISION, provision_arg(2, lun_id=s.lun_id))
    assert not a.provisioned


def test_afu_debug_no_capability_eopnotsupp_decision_17(make_adapter):
    a = make_adapter(afu_debug=False)
    d = add_disk(a)
    fails(a, DEBUG, debug_arg(), errno.EOPNOTSUPP)
    fails(a, DEBUG, debug_arg(n=10**6), errno.EOPNOTSUPP)          # before data_len


def test_afu_debug_data_len_too_big_einval(embedded):
    a = embedded
    d = add_disk(a)
    buf = ctypes.create_string_buffer(64)
    a.inject_fault("alloc")
    fails(a, DEBUG, debug_arg(ea=ctypes.addressof(buf), n=262145), errno.EINVAL)
    fails(a, DEBUG, debug_arg(ea=ctypes.addressof(buf), n=0xFFFFFFFF), errno.EINVAL)
    assert a.driver.afu.faults.pending() == {"alloc": 1}          # before the allocation


def test_afu_debug_bounce_buffer_allocation_enomem(adapter):
    a = adapter
    d = add_disk(a)
    a.inject_fault("alloc")
    fails(a, DEBUG, debug_arg(ea=8, n=64, flags=uapi.HT_CXLFLASH_HOST_WRITE),
          errno.ENOMEM)                                           # before the copy-in
    a.inject_fault("alloc")
    cxlflash.ioctl(a, DEBUG, debug_arg(n=0))                      # no data, no buffer


def test_afu_debug_host_write_copy_in_efault(embedded):
    a = embedded
    d = add_disk(a)
    a.inject_fault("afu_cmd")
    fails(a, DEBUG, debug_arg(ea=8, n=64, flags=uapi.HT_CXLFLASH_HOST_WRITE), errno.EFAULT)
    assert a.driver.afu.faults.pending() == {"afu_cmd": 1}        # no AFU command sent


@pytest.mark.parametrize("err", [None, errno.ETIMEDOUT])
def test_afu_debug_afu_command_failed_no_partial_read(adapter, err):
    a = adapter
    d = add_disk(a)
    buf = ctypes.create_string_buffer(b"\xAA" * 48, 48)
    a.inject_fault("afu_cmd", err=err)
    fails(a, DEBUG, debug_arg(0x04, ctypes.addressof(buf), 48), err or errno.EIO)
    assert buf.raw == b"\xAA" * 48
    fails(a, DEBUG, debug_arg(0x7F, ctypes.addressof(buf), 48), errno.EIO)  # AFU refuses
    cxlflash.ioctl(a, DEBUG, debug_arg(0x04, ctypes.addressof(buf), 48))
    assert buf.raw != b"\xAA" * 48


def test_afu_debug_read_copy_out_efault(embedded):
    a = embedded
    d = add_disk(a)
    sent = a.driver.afu.counters["afu_cmds"]
    fails(a, DEBUG, debug_arg(0x04, ea=8, n=48), errno.EFAULT)
    assert a.driver.afu.counters["afu_cmds"] == sent + 1          # the command ran


def test_ht_copy_out_fault_efault_operation_took_effect(embedded):
    a = embedded
    d = add_disk(a)
    fails(a, PROVISION, bytes(provision_arg(1, size=CH)), errno.EFAULT)
    assert len(a.provisioned) == 1                                # the LUN exists
    fails(a, PROVISION, bytes(provision_arg(3)), errno.EFAULT)
    buf = ctypes.create_string_buffer(48)
    fails(a, DEBUG, bytes(debug_arg(0x04, ctypes.addressof(buf), 48)), errno.EFAULT)
    assert buf.raw != bytes(48)                                   # data was delivered
