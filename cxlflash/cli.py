"""The ``cxlflash`` command.

``cxlflash bench``  benchmark runs (see ``cxlflash bench --help``)
``cxlflash info``   what the package is built with
``cxlflash serve``  the driver as a daemon (see ``cxlflash serve --help``)
``cxlflash ctl``    what a daemon serves: LUNs, contexts, counters
``cxlflash nbd``    export new LUNs over NBD (see ``cxlflash nbd --help``)
"""
import argparse
import os
import sys

from . import __version__


def _size(text):
    """A size in bytes: 4096, 64k, 512M, 2G, 1T."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64k, 512M, 2G)")


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return v
    return parse


def _percent(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}")
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError(f"must be 0..100: {text!r}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump, exit status 2.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = _Parser(prog="cxlflash", description="The CXL Flash superpipe engine in user space.")
    p.add_argument("--version", action="version", version=f"cxlflash {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    from .bench import COLUMNS, MAX_THREADS
    from .bench.options import MAX_CLIENTS
    b = sub.add_parser(
        "bench", help="run benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark the translation engine and the data path, each row "
                    "with its raw baseline measured in the same run.  With no "
                    "arguments: a ~20 s standard matrix on an in-memory adapter.",
        epilog=COLUMNS + """

Targets: 'memory' (default); a path that does not exist is created (a sparse
file of --size bytes, left in place). An existing file or block device may
hold data: a run that writes (every workload but 'io' with --read-pct 100)
refuses it, saying what it would overwrite, unless --force is given; a
read-only 'io' run opens it read-only and reads what it holds, without a
prefill.""")
    b.add_argument("workload", nargs="?", default=None,
                   choices=["matrix", "io", "arkdb", "resize-storm"],
                   help="matrix (default), io (one block I/O workload from the "
                        "options), arkdb (20 vLUNs grown in 4 MiB steps), "
                        "resize-storm (vLUNs growing and shrinking under I/O)")
    b.add_argument("-t", "--target", default="memory",
                   help="'memory' (default), a file path (created with --size if "
                        "missing), a block device, or an RBD image "
                        "rbd:POOL/IMAGE[?conf=PATH][&id=NAME]; an existing one is only "
                        "written with --force")
    b.add_argument("--size", type=_size, default=None,
                   help="LUN size for memory or a new file (default 1G)")
    b.add_argument("--lun", choices=["virtual", "direct"], default="virtual",
                   help="I/O through a virtual LUN (default) or the whole LUN directly")
    b.add_argument("--vlun-size", type=_size, default=None,
                   help="virtual LUN size in bytes (default 512M); with --lun "
                        "direct, the part of the LUN the I/O covers")
    b.add_argument("-r", "--read-pct", type=_percent, default=None,
                   help="percentage of reads, 0..100 (io default 100)")
    b.add_argument("-n", "--blocks", type=_positive(int), default=None,
                   help="blocks per request (io default 1)")
    b.add_argument("--threads", dest="threads", type=_positive(int), default=1,
                   help=f"worker threads, 1..{MAX_THREADS} (default 1), each with "
                        "its own requests")
    b.add_argument("-q", "--qd", dest="qd", type=_positive(int), default=None,
                   help="queue depth: requests each thread keeps in flight through "
                        "the adapter's engine, lun.listio(qd=N), with the raw "
                        "baseline at the same depth (1..65536, default 1); 'io' "
                        "also runs fio at that depth where fio is on PATH")
    b.add_argument("--no-fio", dest="fio", action="store_false",
                   help="io: do not run fio for comparison")
    b.add_argument("-p", "--pattern", choices=["random", "seq"], default=None,
                   help="random (default) or sequential LBAs")
    b.add_argument("-d", "--duration", type=_positive(float), default=None,
                   help="seconds per measured row (matrix default 2.5, others 5)")
    b.add_argument("--warmup", type=float, default=None,
                   help="unrecorded warm-up seconds before each I/O row (default 0.3)")
    b.add_argument("--compare-raw", dest="compare_raw", action="store_true", default=True,
                   help="run the same requests on the bare backing store (default)")
    b.add_argument("--no-compare-raw", dest="compare_raw", action="store_false",
                   help="skip the raw baseline")
    b.add_argument("--direct-io", action="store_true",
                   help="open a file or block device target with O_DIRECT")
    b.add_argument("--force", "--allow-overwrite", dest="force", action="store_true",
                   help="let a run that writes overwrite an existing file or block "
                        "device (what it overwrites is printed first)")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--json", metavar="FILE", help="write every figure, the machine, "
                   "the versions and the options as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="draw latency histograms and "
                   "throughput over time (needs matplotlib: cxlflash[plot])")
    b.add_argument("--quiet", action="store_true", help="no progress display")
    b.add_argument("--connect", metavar="SOCKET",
                   help="run as a client of the cxlflash daemon at SOCKET (cxlflash "
                        "serve), on its first LUN with room for the virtual LUN, or "
                        "the LUN -t WWID names (cxlflash ctl luns); the core rows of "
                        "the matrix still run in this process")
    b.add_argument("--clients", type=_positive(int), default=None, metavar="N",
                   help=f"N client processes (1..{MAX_CLIENTS}) run the workload at once "
                        "against one daemon -- the one --connect names, else one "
                        "started for the run with an in-memory LUN of N x --size; each "
                        "client's rows and their total are reported")
    sub.add_parser("info", help="versions and build facts")
    from .server import ctl, daemon
    daemon.add_parser(sub)
    daemon.add_nbd_parser(sub)
    ctl.add_parser(sub)
    return p


def _bench(args):
    from . import bench
    workload = args.workload
    io_opts = any(v is not None for v in (args.read_pct, args.blocks, args.pattern))
    if workload is None:
        workload = "io" if io_opts or args.threads > 1 or args.qd else "matrix"
    if args.qd is not None and args.qd > 65536:
        raise bench.BenchError(f"--qd {args.qd} is more than 65536, the engine's "
                               "deepest queue")
    if args.threads > bench.MAX_THREADS:
        raise bench.BenchError(
            f"--threads {args.threads} is more than {bench.MAX_THREADS}: each thread is a "
            f"worker of its own, and on this machine's {os.cpu_count()} cores more only "
            "wait for each other")
    if workload == "matrix" and io_opts:
        raise bench.BenchError("--read-pct, --blocks and --pattern choose an io "
                               "workload: run 'cxlflash bench io ...'")
    if args.clients is not None and args.clients > bench.MAX_CLIENTS:
        raise bench.BenchError(f"--clients {args.clients} is more than {bench.MAX_CLIENTS}")
    if args.clients and not args.connect:
        if args.target != "memory":
            raise bench.BenchError(
                "--clients without --connect starts a daemon with an in-memory LUN; to "
                f"run on {args.target}, start one on it (cxlflash serve --socket PATH "
                f"--lun {args.target}) and give --connect PATH")
    if args.connect and args.size is not None:
        raise bench.BenchError("--size is the size of a LUN this run creates; with "
                               "--connect the run uses the daemon's LUNs")
    o = bench.Options(workload=workload, target=args.target, lun=args.lun,
                      threads=args.threads, compare_raw=args.compare_raw,
                      seed=args.seed, quiet=args.quiet, direct_io=args.direct_io,
                      force=args.force, qd=args.qd or 1, fio=args.fio,
                      connect=args.connect, clients=args.clients or 0)
    if args.size is not None:
        o.size = args.size
        o.size_given = True
    elif workload == "arkdb":
        o.size = 8 << 30        # 20 vLUNs of at least one 256 MiB chunk each (sparse)
    if args.vlun_size is not None:
        o.vlun_blocks = max(1, args.vlun_size // 4096)
    if args.read_pct is not None:
        o.read_pct = args.read_pct
    if args.blocks is not None:
        o.blocks = args.blocks
    if args.pattern is not None:
        o.pattern = args.pattern
    if o.clients and o.lun == "direct" and bench.writes_target(o):
        raise bench.BenchError("--clients with --lun direct would have every client write "
                               "the same blocks of the physical LUN: use virtual LUNs "
                               "(the default) or a read-only run (io -r 100)")
    o.duration = args.duration if args.duration is not None else (
        2.5 if workload == "matrix" else 5.0)
    if args.warmup is not None:
        if args.warmup < 0:
            raise bench.BenchError("--warmup must be >= 0")
        o.warmup = args.warmup
    if o.target == "memory" and not o.connect and o.size % 4096:
        raise bench.BenchError("--size must be a multiple of 4096")
    if args.plot:
        try:
            import matplotlib  # noqa: F401 -- only checks it is there
        except ImportError:
            raise bench.BenchError("--plot needs matplotlib: pip install 'cxlflash[plot]'")
    for path in (args.json, args.plot):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise bench.BenchError(f"cannot write {path}: no such directory")
        if os.path.isdir(path):
            raise bench.BenchError(f"cannot write {path}: it is a directory")
        if not os.access(parent, os.W_OK):
            raise bench.BenchError(f"cannot write {path}: permission denied")
    progress = bench.Progress(enabled=False if args.quiet else None)
    from ._core.engine import engine_info
    if o.clients:
        where = (f"{o.clients} client processes of the daemon at {o.connect}" if o.connect
                 else f"{o.clients} client processes of a daemon started for the run")
    elif o.connect:
        where = f"a client of the daemon at {o.connect}"
    else:
        where = f"{o.target}{'' if o.target != 'memory' else ' (in-memory adapter)'}"
    print(f"cxlflash {__version__} bench: {workload} on {where}, "
          f"{o.duration:g} s per row, engine {engine_info()['engine']}, qd {o.qd}",
          flush=True)
    log = bench.RunLog(out=sys.stdout)
    try:
        rows = bench.run(o, progress, log)
    except BaseException as e:
        # Ctrl-C, or an error in a later row: the rows already measured are
        # shown (and written) before the error is reported.
        if log.rows:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {e}"
            print(f"the run stopped ({why}); the {len(log.rows)} rows measured before:")
            print(bench.format_table(log.rows))
            if args.json:
                bench.to_json(log.rows, o, args.json, log, incomplete=why)
                print(f"figures written to {args.json}")
        raise
    clients = getattr(log, "clients", None)
    if clients:
        for k, (pid, crows, _) in enumerate(clients, 1):
            print(f"client {k} (pid {pid}):")
            print(bench.format_table(crows))
        print(f"total of the {len(clients)} clients (rates and MB/s added, each row run "
              "by every client over the same window; latencies of all requests):")
    print(bench.format_table(rows))
    fio = bench.format_fio(rows)
    if fio:
        print(fio)
    print(bench.format_phases(log, o))
    if args.json:
        bench.to_json(rows, o, args.json, log,
                      extra={"clients": [doc for _, _, doc in clients]} if clients else None)
        print(f"figures written to {args.json}")
    if args.plot:
        bench.plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    failed = [r for r in rows if r.failed or r.main.errors]
    for r in failed:
        print(f"error: {r.name}: "
              + (f"data verification {r.verified}" if r.failed else
                 f"{r.main.errors} requests failed"), file=sys.stderr)
    return 1 if failed else 0


def _info():
    from .bench import machine_info
    for k, v in machine_info().items():
        print(f"{k:10} {v}")
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "serve":
            from .server import daemon
            return daemon.run(args)
        if args.command == "nbd":
            from .server import daemon
            return daemon.run_nbd(args)
        if args.command == "ctl":
            from .server import ctl
            return ctl.run(args)
        return _info()
    except KeyboardInterrupt:
        print("cxlflash: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .bench import BenchError
        if isinstance(e, (BenchError, OSError)):
            print(f"cxlflash: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
