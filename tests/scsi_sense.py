"""SCSI sense data for VERIFY tests (spec §15.1): 18 bytes, fixed format
(response code 0x70/0x71) or descriptor format (0x72/0x73)."""


def fixed_sense(key, asc=0, ascq=0, addl=10, code=0x70):
    """Fixed format: key in byte 2, additional length in byte 7, ASC and
    ASCQ in bytes 12 and 13."""
    s = bytearray(18)
    s[0], s[2], s[7], s[12], s[13] = code, key, addl, asc, ascq
    return s


def desc_sense(key, asc=0, ascq=0, code=0x72):
    """Descriptor format: key, ASC and ASCQ in bytes 1 to 3."""
    s = bytearray(18)
    s[0], s[1], s[2], s[3] = code, key, asc, ascq
    return s
