"""Build the Cython core.

Release builds turn bounds and wraparound checks off.  ``CXLFLASH_DEBUG=1``
at build time turns them on, together with the C asserts of the core.

Optional C libraries are detected here; the package builds and works
without them: liburing (the io_uring engine; without it the engine is a
thread pool) and librbd (LUNs on Ceph RBD images, ``cxlflash._core.rbd``;
without it asking for one says what to install).  ``CXLFLASH_LIBURING=0``
and ``CXLFLASH_LIBRBD=0`` build without them even where they are
installed.
"""
import glob
import os
import shutil
import sys
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CXLFLASH_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
macros = [] if DEBUG else [("NDEBUG", "1")]
cflags = ["-O0", "-g"] if DEBUG else ["-O3"]



def have_library(header, function, library):
    """Whether a program using ``function`` of ``header`` compiles and
    links against ``library`` here."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.errors import CompileError, LinkError
    from setuptools._distutils.sysconfig import customize_compiler
    cc = new_compiler()
    customize_compiler(cc)
    tmp = tempfile.mkdtemp(prefix="cxlflash-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(f"#include <{header}>\nint main(void) {{ (void) {function}; return 0; }}\n")
        try:
            objs = cc.compile([src], output_dir=tmp)
            cc.link_executable(objs, os.path.join(tmp, "probe"), libraries=[library])
        except (CompileError, LinkError):
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def engine_options():
    """Macros and libraries of the I/O engine (liburing when present)."""
    if os.environ.get("CXLFLASH_LIBURING", "") == "0":
        print("cxlflash: building without liburing (CXLFLASH_LIBURING=0): "
              "the I/O engine is a thread pool", file=sys.stderr)
        return [], []
    if have_library("liburing.h", "io_uring_queue_init", "uring"):
        return [("CXLFLASH_HAVE_LIBURING", "1")], ["uring"]
    print("cxlflash: liburing not found (install liburing-dev for the io_uring "
          "engine): the I/O engine is a thread pool", file=sys.stderr)
    return [], []


def rbd_wanted():
    """Whether to build the RBD backend (cxlflash._core.rbd): librbd's
    headers and library are here, and CXLFLASH_LIBRBD is not 0."""
    if os.environ.get("CXLFLASH_LIBRBD", "") == "0":
        print("cxlflash: building without librbd (CXLFLASH_LIBRBD=0): no RBD LUNs",
              file=sys.stderr)
        return False
    if have_library("rbd/librbd.h", "rbd_aio_write_zeroes", "rbd"):
        return True
    print("cxlflash: librbd not found (install librbd-dev for LUNs on Ceph RBD "
          "images): building without it", file=sys.stderr)
    return False


def extension(path):
    name = os.path.splitext(os.path.basename(path))[0]
    define, libraries = macros, []
    if name == "rbd":
        libraries = ["rbd", "rados"]
    if name == "engine":
        extra, libraries = engine_options()
        define = macros + extra
    return Extension(
        "cxlflash._core." + name,
        [path],
        include_dirs=["cxlflash/_core/includes"],
        define_macros=define,
        libraries=libraries,
        extra_compile_args=cflags,
    )


paths = sorted(glob.glob("cxlflash/_core/*.pyx"))
if not rbd_wanted():
    paths.remove(os.path.join("cxlflash", "_core", "rbd.pyx"))
extensions = [extension(path) for path in paths]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
