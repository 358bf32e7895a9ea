"""The user/kernel boundary of the ioctls: copying the caller's argument
in (EFAULT when it is not a buffer of the structure's size) and the result
out (EFAULT when it is read-only), and the header checks every ioctl
makes (the kernel's copy_from_user / copy_to_user)."""
import ctypes
import errno

from ..errors import CxlFlashError


def copy_in(arg, struct_type):
    """Copy the caller's argument into a fresh structure: EFAULT when it is
    not a buffer of at least the structure's size."""
    size = ctypes.sizeof(struct_type)
    try:
        view = memoryview(arg).cast("B")
    except TypeError:
        raise CxlFlashError(errno.EFAULT, f"the argument is not a buffer of "
                            f"{size} bytes (expected a {struct_type.__name__})") from None
    if view.nbytes < size:
        raise CxlFlashError(errno.EFAULT, f"the argument has {view.nbytes} bytes; "
                            f"{struct_type.__name__} needs {size}")
    return struct_type.from_buffer_copy(view[:size])


def copy_out(arg, struct):
    """Copy the result back to the caller: EFAULT when the buffer is
    read-only (the operation has taken effect)."""
    size = ctypes.sizeof(struct)
    view = memoryview(arg).cast("B")
    if view.readonly:
        raise CxlFlashError(errno.EFAULT, "the argument is read-only: the result "
                            "could not be copied back (the operation took effect)")
    view[:size] = bytes(struct)


def check_header(hdr, host=False):
    if hdr.version != 0:
        raise CxlFlashError(errno.EINVAL, f"unsupported structure version {hdr.version} "
                            "(only version 0 exists)")
    rsvd = hdr.rsvd[0] | hdr.rsvd[1] | (0 if host else hdr.rsvd[2])
    if rsvd or hdr.return_flags:
        raise CxlFlashError(errno.EINVAL, "hdr.rsvd and hdr.return_flags must be zero on input")
