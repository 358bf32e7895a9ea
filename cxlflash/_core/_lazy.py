"""Modules imported on first use.

``import cxlflash`` must stay cheap (a command-line tool or a short-lived
program pays it every time): numpy (~150 ms) and asyncio (~20 ms) are
imported only when something of theirs is first looked up.  The first
lookup of each attribute is forwarded to the real module and kept on the
proxy, so later lookups are plain attribute reads.
"""
import importlib

__all__ = ["LazyModule", "numpy", "asyncio"]


class LazyModule:
    """A stand-in for the module ``name`` that imports it on first use."""

    def __init__(self, name):
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr):
        value = getattr(importlib.import_module(self.__dict__["_lazy_name"]), attr)
        self.__dict__[attr] = value
        return value

    def __repr__(self):
        return f"<lazily imported module {self.__dict__['_lazy_name']!r}>"


numpy = LazyModule("numpy")
asyncio = LazyModule("asyncio")
