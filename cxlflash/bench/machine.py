"""What the run ran on (the JSON's "machine" and ``cxlflash info``)."""
import os
import platform
import sys

from .. import __version__


def machine_info():
    from .._core.engine import engine_info
    eng = engine_info()
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or _cpu_model(),
            "cores": os.cpu_count(), "python": sys.version.split()[0],
            "numpy": _numpy_version(), "cxlflash": __version__,
            "engine": eng["engine"] + (f" ({eng['reason']})" if eng["reason"] else ""),
            "librbd": _librbd()}


def _librbd():
    """librbd's version, or why there are no RBD LUNs in this build."""
    try:
        from .._core import rbd
    except ImportError:
        return "not built (install librbd-dev and reinstall cxlflash for RBD LUNs)"
    return rbd.version()


def _numpy_version():
    """numpy's version without importing numpy (150 ms) when it is not
    imported yet (``cxlflash info``)."""
    if "numpy" in sys.modules:
        return sys.modules["numpy"].__version__
    from importlib.metadata import version
    return version("numpy")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
