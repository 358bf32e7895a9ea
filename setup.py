"""Build the Cython core.

Release builds turn bounds and wraparound checks off.  ``CXLFLASH_DEBUG=1``
at build time turns them on, together with the C asserts of the core.
"""
import glob
import os

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

extensions = [
    Extension(
        "cxlflash._core." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=["cxlflash/_core/includes"],
        define_macros=macros,
        extra_compile_args=cflags,
    )
    for path in sorted(glob.glob("cxlflash/_core/*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
