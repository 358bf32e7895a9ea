"""cxlflash: the CXL Flash superpipe block translation engine in user space."""
__version__ = "0.1.0"
