"""How figures are written: rates with SI prefixes, sizes, microseconds."""


def size_name(n):
    """A request size for a row name: 512B, 4k, 1m."""
    for unit, scale in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def si(x):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:7.2f}{unit} "
    return f"{x:7.1f} "


def mib(n):
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def us(ns):
    return "-" if ns != ns else f"{ns / 1000:.1f}"
