"""cxlflash.uapi against the kernel ABI (spec kernel-semantics.md §2).

Every expected value below is written out from the spec's tables (and the
kernel header), never derived from the module under test.
"""

import ctypes
import sys

import pytest

from cxlflash import uapi

U8, U16, U32, U64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# (struct name, sizeof, [(field, offset, ctype, array length or None), ...])
HDR_FIELDS = [
    ("version", 0, U16, None),
    ("rsvd", 2, U16, 3),
    ("flags", 8, U64, None),
    ("return_flags", 16, U64, None),
]
HT_HDR_FIELDS = [
    ("version", 0, U16, None),
    ("subcmd", 2, U16, None),
    ("rsvd", 4, U16, 2),
    ("flags", 8, U64, None),
    ("return_flags", 16, U64, None),
]

LAYOUTS = [
    ("dk_cxlflash_hdr", 24, HDR_FIELDS),
    ("dk_cxlflash_attach", 144, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("num_interrupts", 24, U64, None),
        ("context_id", 32, U64, None),
        ("mmio_size", 40, U64, None),
        ("block_size", 48, U64, None),
        ("adap_fd", 56, U64, None),
        ("last_lba", 64, U64, None),
        ("max_xfer", 72, U64, None),
        ("reserved", 80, U64, 8),
    ]),
    ("dk_cxlflash_detach", 96, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id", 24, U64, None),
        ("reserved", 32, U64, 8),
    ]),
    ("dk_cxlflash_udirect", 112, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id", 24, U64, None),
        ("rsrc_handle", 32, U64, None),
        ("last_lba", 40, U64, None),
        ("reserved", 48, U64, 8),
    ]),
    ("dk_cxlflash_uvirtual", 120, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id", 24, U64, None),
        ("lun_size", 32, U64, None),
        ("rsrc_handle", 40, U64, None),
        ("last_lba", 48, U64, None),
        ("reserved", 56, U64, 8),
    ]),
    ("dk_cxlflash_release", 104, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id", 24, U64, None),
        ("rsrc_handle", 32, U64, None),
        ("reserved", 40, U64, 8),
    ]),
    ("dk_cxlflash_resize", 120, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id", 24, U64, None),
        ("rsrc_handle", 32, U64, None),
        ("req_size", 40, U64, None),
        ("last_lba", 48, U64, None),
        ("reserved", 56, U64, 8),
    ]),
    ("dk_cxlflash_clone", 112, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id_src", 24, U64, None),
        ("context_id_dst", 32, U64, None),
        ("adap_fd_src", 40, U64, None),
        ("reserved", 48, U64, 8),
    ]),
    ("dk_cxlflash_verify", 144, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("context_id", 24, U64, None),
        ("rsrc_handle", 32, U64, None),
        ("hint", 40, U64, None),
        ("last_lba", 48, U64, None),
        ("sense_data", 56, U8, 18),
        ("pad", 74, U8, 6),
        ("reserved", 80, U64, 8),
    ]),
    ("dk_cxlflash_recover_afu", 120, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("reason", 24, U64, None),
        ("context_id", 32, U64, None),
        ("mmio_size", 40, U64, None),
        ("adap_fd", 48, U64, None),
        ("reserved", 56, U64, 8),
    ]),
    ("dk_cxlflash_manage_lun", 104, [
        ("hdr", 0, "dk_cxlflash_hdr", None),
        ("wwid", 24, U8, 16),
        ("reserved", 40, U64, 8),
    ]),
    ("ht_cxlflash_hdr", 24, HT_HDR_FIELDS),
    ("ht_cxlflash_lun_provision", 160, [
        ("hdr", 0, "ht_cxlflash_hdr", None),
        ("port", 24, U16, None),
        ("reserved16", 26, U16, 3),
        ("size", 32, U64, None),
        ("lun_id", 40, U64, None),
        ("wwid", 48, U8, 16),
        ("max_num_luns", 64, U64, None),
        ("cur_num_luns", 72, U64, None),
        ("max_cap_port", 80, U64, None),
        ("cur_cap_port", 88, U64, None),
        ("reserved", 96, U64, 8),
    ]),
    ("ht_cxlflash_afu_debug", 120, [
        ("hdr", 0, "ht_cxlflash_hdr", None),
        ("reserved8", 24, U8, 4),
        ("afu_subcmd", 28, U8, 12),
        ("data_ea", 40, U64, None),
        ("data_len", 48, U32, None),
        ("reserved32", 52, U32, None),
        ("reserved", 56, U64, 8),
    ]),
]

LAYOUT_IDS = [name for name, _, _ in LAYOUTS]


@pytest.mark.parametrize("name,size,fields", LAYOUTS, ids=LAYOUT_IDS)
def test_struct_size(name, size, fields):
    cls = getattr(uapi, name)
    assert issubclass(cls, ctypes.Structure)
    assert cls.__name__ == name
    assert ctypes.sizeof(cls) == size


@pytest.mark.parametrize("name,size,fields", LAYOUTS, ids=LAYOUT_IDS)
def test_struct_field_names_in_order(name, size, fields):
    cls = getattr(uapi, name)
    assert [f[0] for f in cls._fields_] == [f[0] for f in fields]


@pytest.mark.parametrize("name,size,fields", LAYOUTS, ids=LAYOUT_IDS)
def test_struct_field_offsets_and_types(name, size, fields):
    cls = getattr(uapi, name)
    declared = dict(cls._fields_)
    for field, offset, ctype, length in fields:
        assert getattr(cls, field).offset == offset, (name, field)
        actual = declared[field]
        if isinstance(ctype, str):  # nested header structure
            assert actual is getattr(uapi, ctype), (name, field)
            assert getattr(cls, field).size == 24, (name, field)
        elif length is None:
            assert actual is ctype, (name, field)
            assert getattr(cls, field).size == ctypes.sizeof(ctype), (name, field)
        else:
            assert issubclass(actual, ctypes.Array), (name, field)
            assert actual._type_ is ctype, (name, field)
            assert actual._length_ == length, (name, field)
            assert getattr(cls, field).size == length * ctypes.sizeof(ctype), (name, field)


def test_struct_fields_tile_the_struct():
    """No hidden padding: every byte belongs to exactly one field."""
    for name, size, fields in LAYOUTS:
        cls = getattr(uapi, name)
        covered = sorted((getattr(cls, f).offset, getattr(cls, f).size) for f, *_ in fields)
        pos = 0
        for offset, fsize in covered:
            assert offset == pos, (name, offset)
            pos += fsize
        assert pos == size, name


def test_struct_roundtrip_through_bytes():
    att = uapi.dk_cxlflash_attach()
    att.hdr.flags = uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT | 2
    att.context_id = 0x1234_0000_0007
    att.last_lba = 0xFFFF
    raw = bytes(att)
    assert len(raw) == 144
    assert raw[8:16] == (0x8000000000000002).to_bytes(8, sys.byteorder)  # host order
    back = uapi.dk_cxlflash_attach.from_buffer_copy(raw)
    assert back.context_id == 0x1234_0000_0007
    assert back.last_lba == 0xFFFF

    ver = uapi.dk_cxlflash_verify()
    ver.sense_data[17] = 0xAB
    assert bytes(ver)[56 + 17] == 0xAB


def test_unions():
    assert issubclass(uapi.cxlflash_ioctls, ctypes.Union)
    assert issubclass(uapi.cxlflash_ht_ioctls, ctypes.Union)
    assert ctypes.sizeof(uapi.cxlflash_ioctls) == 144
    assert ctypes.sizeof(uapi.cxlflash_ht_ioctls) == 160
    assert [f[0] for f in uapi.cxlflash_ioctls._fields_] == [
        "attach", "detach", "udirect", "uvirtual", "release",
        "resize", "clone", "verify", "recover_afu", "manage_lun",
    ]
    assert [f[0] for f in uapi.cxlflash_ht_ioctls._fields_] == [
        "lun_provision", "afu_debug",
    ]
    assert dict(uapi.cxlflash_ioctls._fields_)["verify"] is uapi.dk_cxlflash_verify
    assert dict(uapi.cxlflash_ht_ioctls._fields_)["afu_debug"] is uapi.ht_cxlflash_afu_debug


# ---------------------------------------------------------------------------
# Request numbers (spec §2.2: name, nr, struct, size, full number)
# ---------------------------------------------------------------------------

REQUESTS = [
    ("DK_CXLFLASH_ATTACH", 0x80, "dk_cxlflash_attach", 144, 0xC090CA80),
    ("DK_CXLFLASH_USER_DIRECT", 0x81, "dk_cxlflash_udirect", 112, 0xC070CA81),
    ("DK_CXLFLASH_RELEASE", 0x82, "dk_cxlflash_release", 104, 0xC068CA82),
    ("DK_CXLFLASH_DETACH", 0x83, "dk_cxlflash_detach", 96, 0xC060CA83),
    ("DK_CXLFLASH_VERIFY", 0x84, "dk_cxlflash_verify", 144, 0xC090CA84),
    ("DK_CXLFLASH_RECOVER_AFU", 0x85, "dk_cxlflash_recover_afu", 120, 0xC078CA85),
    ("DK_CXLFLASH_MANAGE_LUN", 0x86, "dk_cxlflash_manage_lun", 104, 0xC068CA86),
    ("DK_CXLFLASH_USER_VIRTUAL", 0x87, "dk_cxlflash_uvirtual", 120, 0xC078CA87),
    ("DK_CXLFLASH_VLUN_RESIZE", 0x88, "dk_cxlflash_resize", 120, 0xC078CA88),
    ("DK_CXLFLASH_VLUN_CLONE", 0x89, "dk_cxlflash_clone", 112, 0xC070CA89),
    ("HT_CXLFLASH_LUN_PROVISION", 0xBF, "ht_cxlflash_lun_provision", 160, 0xC0A0CABF),
    ("HT_CXLFLASH_AFU_DEBUG", 0xBE, "ht_cxlflash_afu_debug", 120, 0xC078CABE),
]
DK_REQUESTS = [r for r in REQUESTS if r[0].startswith("DK_")]
HT_REQUESTS = [r for r in REQUESTS if r[0].startswith("HT_")]


@pytest.mark.parametrize("name,nr,struct,size,number", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_number(name, nr, struct, size, number):
    assert getattr(uapi, name) == number
    # the encoding pieces, written out: dir READ|WRITE=3 <<30, size <<16,
    # magic 0xCA <<8, nr
    assert number == (3 << 30) | (size << 16) | (0xCA << 8) | nr


def test_attach_number_literal():
    assert uapi.DK_CXLFLASH_ATTACH == 0xC090CA80
    assert uapi.CXL_MAGIC == 0xCA


def test_ioc_helpers():
    assert uapi._IOWR(0xCA, 0x80, uapi.dk_cxlflash_attach) == 0xC090CA80
    assert uapi._IOC(3, 0xCA, 0x80, 144) == 0xC090CA80
    assert uapi._IOC(1, 0x12, 0x34, 8) == 0x40081234
    assert uapi._IOC(2, 0x12, 0x34, 8) == 0x80081234
    assert uapi._IOC_NR(0xC0A0CABF) == 0xBF
    assert uapi._IOC_TYPE(0xC0A0CABF) == 0xCA
    assert uapi._IOC_SIZE(0xC0A0CABF) == 160
    assert uapi._IOC_DIR(0xC0A0CABF) == 3


def test_dk_ioctls_table():
    expected = {number: struct for _, _, struct, _, number in DK_REQUESTS}
    assert set(uapi.DK_IOCTLS) == set(expected)
    assert len(uapi.DK_IOCTLS) == 10
    for number, struct in expected.items():
        assert uapi.DK_IOCTLS[number] is getattr(uapi, struct)
    for _, _, _, size, number in DK_REQUESTS:
        assert ctypes.sizeof(uapi.DK_IOCTLS[number]) == size
        assert ctypes.sizeof(uapi.DK_IOCTLS[number]) == (number >> 16) & 0x3FFF


def test_ht_ioctls_table():
    expected = {number: struct for _, _, struct, _, number in HT_REQUESTS}
    assert set(uapi.HT_IOCTLS) == set(expected)
    assert len(uapi.HT_IOCTLS) == 2
    for number, struct in expected.items():
        assert uapi.HT_IOCTLS[number] is getattr(uapi, struct)
    for _, _, _, size, number in HT_REQUESTS:
        assert ctypes.sizeof(uapi.HT_IOCTLS[number]) == size
        assert ctypes.sizeof(uapi.HT_IOCTLS[number]) == (number >> 16) & 0x3FFF


def test_ioctl_names():
    assert uapi.IOCTL_NAMES == {number: name for name, _, _, _, number in REQUESTS}


# ---------------------------------------------------------------------------
# Flags and constants (spec §2.1, §2.4, §2.5, §2.8a)
# ---------------------------------------------------------------------------

CONSTANTS = {
    # §2.4 flags
    "DK_CXLFLASH_VERSION_0": 0,
    "DK_CXLFLASH_ALL_PORTS_ACTIVE": 0x1,
    "DK_CXLFLASH_APP_CLOSE_ADAP_FD": 0x2,
    "DK_CXLFLASH_CONTEXT_SQ_CMD_MODE": 0x4,
    "DK_CXLFLASH_ATTACH_REUSE_CONTEXT": 0x8000000000000000,
    "DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME": 0x8000000000000000,
    "DK_CXLFLASH_VERIFY_HINT_SENSE": 0x8000000000000000,
    "DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET": 0x8000000000000000,
    "DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE": 0x8000000000000000,
    "DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE": 0x4000000000000000,
    "DK_CXLFLASH_MANAGE_LUN_ALL_PORTS_ACCESSIBLE": 0x2000000000000000,
    "DK_CXLFLASH_VERIFY_SENSE_LEN": 18,
    "DK_CXLFLASH_MANAGE_LUN_WWID_LEN": 16,
    "HT_CXLFLASH_VERSION_0": 0,
    "HT_CXLFLASH_LUN_PROVISION_SUBCMD_CREATE_LUN": 1,
    "HT_CXLFLASH_LUN_PROVISION_SUBCMD_DELETE_LUN": 2,
    "HT_CXLFLASH_LUN_PROVISION_SUBCMD_QUERY_PORT": 3,
    "HT_CXLFLASH_AFU_DEBUG_MAX_DATA_LEN": 262144,
    "HT_CXLFLASH_AFU_DEBUG_SUBCMD_LEN": 12,
    "HT_CXLFLASH_HOST_READ": 0,
    "HT_CXLFLASH_HOST_WRITE": 1,
    "CXL_MAGIC": 0xCA,
    # §2.1
    "CXLFLASH_WWID_LEN": 16,
    "CXLFLASH_BLOCK_SIZE": 4096,
    "MAX_CONTEXT": 512,
    "MC_CHUNK_SHIFT": 16,
    "MC_CHUNK_SIZE": 65536,
    "MC_RHT_NMASK": 16,
    "LXT_GROUP_SIZE": 8,
    "LXT_LUNIDX_SHIFT": 8,
    "LXT_PERM_SHIFT": 4,
    "MAX_AUN_CLONE_CNT": 255,
    "CXLFLASH_MAX_XFER_SIZE": 16 * 1024 * 1024,
    "CXLFLASH_MAX_SECTORS": 32768,
    "MAX_SECTOR_UNIT": 512,
    "CXLFLASH_NUM_VLUNS": 512,
    "CXLFLASH_MAX_FC_PORTS": 4,
    "CXLFLASH_MMIO_SIZE": 65536,
    "SISL_WWID_DATA_LEN": 16,
    "SISL_SENSE_DATA_LEN": 20,
    "MAX_CXLFLASH_IOCTL_SZ": 144,
    "MAX_HT_CXLFLASH_IOCTL_SZ": 160,
    # §2.5
    "RHT_PERM_READ": 1,
    "RHT_PERM_WRITE": 2,
    "RHT_PERM_RW": 3,
    # §2.8a
    "SISL_AFU_RC_RHT_INVALID": 0x01,
    "SISL_AFU_RC_RHT_UNALIGNED": 0x02,
    "SISL_AFU_RC_RHT_OUT_OF_BOUNDS": 0x03,
    "SISL_AFU_RC_RHT_DMA_ERR": 0x04,
    "SISL_AFU_RC_RHT_RW_PERM": 0x05,
    "SISL_AFU_RC_LXT_UNALIGNED": 0x12,
    "SISL_AFU_RC_LXT_OUT_OF_BOUNDS": 0x13,
    "SISL_AFU_RC_LXT_DMA_ERR": 0x14,
    "SISL_AFU_RC_LXT_RW_PERM": 0x15,
    "SISL_AFU_RC_NOT_XLATE_HOST": 0x1A,
    "SISL_AFU_RC_NO_CHANNELS": 0x20,
    "SISL_AFU_RC_CAP_VIOLATION": 0x21,
    "SISL_AFU_RC_OUT_OF_DATA_BUFS": 0x30,
    "SISL_AFU_RC_DATA_DMA_ERR": 0x31,
}


@pytest.mark.parametrize("name,value", sorted(CONSTANTS.items()))
def test_constant(name, value):
    actual = getattr(uapi, name)
    assert type(actual) is int, name
    assert actual == value, name


def test_flags_fit_in_u64():
    hdr = uapi.dk_cxlflash_hdr()
    for name, value in CONSTANTS.items():
        if name.startswith("DK_CXLFLASH_") and name.endswith(
            ("ACTIVE", "FD", "MODE", "CONTEXT", "SAME", "SENSE", "RESET",
             "SUPERPIPE", "ACCESSIBLE")
        ):
            hdr.flags = getattr(uapi, name)
            assert hdr.flags == value, name


def test_helpers():
    assert uapi.max_rht_per_context(4096) == 256
    assert uapi.max_rht_per_context(65536) == 4096
    assert uapi.LXT_NUM_GROUPS(0) == 0
    assert uapi.LXT_NUM_GROUPS(1) == 1
    assert uapi.LXT_NUM_GROUPS(8) == 1
    assert uapi.LXT_NUM_GROUPS(9) == 2
    assert uapi.SISL_RHT_FP(1, 3) == 0x13
    assert uapi.SISL_RHT_FP_CLONE(0x13, 1) == 0x11
    assert uapi.SISL_RHT_FP_CLONE(0x02, 1) == 0x00


def test_module_is_self_contained():
    """uapi imports nothing from the rest of the package."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(uapi))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in uapi"
            assert not (node.module or "").startswith("cxlflash"), node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("cxlflash"), alias.name


def test_chunk_geometry_has_one_source():
    """The core defines the chunk geometry (_core/geometry.pxd);
    uapi, which imports nothing of the package, keeps the kernel ABI's
    copy, and the rest of the package uses the core's."""
    from cxlflash import lun
    from cxlflash._core import tables
    from cxlflash.driver import lunmgt, vlun

    assert (tables.MC_CHUNK_SHIFT, tables.MC_CHUNK_SIZE, tables.MC_CHUNK_OFF_MASK) \
        == (uapi.MC_CHUNK_SHIFT, uapi.MC_CHUNK_SIZE, uapi.MC_CHUNK_SIZE - 1)
    assert tables.MC_CHUNK_SIZE == 1 << tables.MC_CHUNK_SHIFT
    # plain ints: numpy refuses np.uint64(x) >> an IntEnum member
    assert {type(tables.MC_CHUNK_SHIFT), type(tables.MC_CHUNK_SIZE),
            type(tables.MC_CHUNK_OFF_MASK)} == {int}
    assert lunmgt.MC_CHUNK_SHIFT is tables.MC_CHUNK_SHIFT
    assert lunmgt.MC_CHUNK_SIZE is tables.MC_CHUNK_SIZE
    assert vlun.MC_CHUNK_SHIFT is tables.MC_CHUNK_SHIFT
    assert lun.MC_CHUNK_SIZE is tables.MC_CHUNK_SIZE
    assert lun.CHUNK_BLOCKS == tables.MC_CHUNK_SIZE and type(lun.CHUNK_BLOCKS) is int


def test_the_cores_abi_constants_equal_uapis():
    """uapi.py keeps the kernel ABI's copy of what the core defines in C
    (tables.pxd: the RHT/LXT layout, permissions, the AFU codes it reports;
    _core/errors.py: the codes' names): each equals the core's."""
    from cxlflash._core import errors as core_errors
    from cxlflash._core import tables

    assert len(tables.ABI) == 14
    for name, value in tables.ABI.items():
        if name == "SCSI_LBA_OUT_OF_RANGE":
            assert value == core_errors.SCSI_LBA_OUT_OF_RANGE == 0x100
        else:
            assert value == getattr(uapi, name), name
        assert type(value) is int
    sisl = {v: k[len("SISL_AFU_RC_"):] for k, v in vars(uapi).items()
            if k.startswith("SISL_AFU_RC_")}
    assert core_errors.AFU_RC_NAMES == sisl
