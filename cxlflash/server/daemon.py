"""``cxlflash serve``: the shared driver as a service.

Everything around :class:`cxlflash.server.service.Server`: the options and
the TOML configuration, the embedded adapter and its LUNs, the listening
socket (created with its mode and group, or inherited by socket activation),
readiness (``READY=1`` on ``$NOTIFY_SOCKET``, the pid file), the signals
that stop it, and the log.

The order of a start, each step only after the one before succeeded:

1. options and configuration checked (exit 2 on a mistake in them);
2. ``--exit-with-parent``: ``PR_SET_PDEATHSIG``;
3. the pid file locked (a second daemon with the same pid file stops here);
4. the socket bound, given its mode and group, then listening (or the
   socket systemd passed as fd 3) -- a live daemon's socket is never taken,
   and this daemon stops here before it opens a LUN the other one serves;
5. the adapter and its LUNs (clients that connect meanwhile wait in the
   listen backlog);
6. the server's accept loop started; then -- the socket accepts -- the pid
   written into the pid file, ``READY=1`` sent, "ready" logged.

SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken by the main
thread with ``sigtimedwait``: no Python signal handler ever runs inside the
server's code.  A stop unlinks the socket path (new clients get ENOENT),
shuts the server down (stop accepting, close every connection, release
every context), closes the adapter (every backing), removes the pid file and
exits 0.  A stop signal that arrives during the start ends it the same way
before readiness.

Exit status: 0 after a stop signal; 1 when the daemon could not start or
serve (socket in use, pid file locked, an error of the driver); 2 for a
mistake in the options or the configuration file.
"""
import ctypes
import fcntl
import grp
import os
import signal
import socket
import stat
import threading

# backing.py imports nothing heavy (the RBD module itself loads when a LUN needs it).
from ..backing import is_rbd, parse_rbd
from ..errors import CxlFlashError

PREFIX = "cxlflash serve: "
DEFAULT_SIZE = 4 << 30
DEFAULT_MODE = 0o660
MAX_PORTS = 4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The keys a configuration file may hold (the options' names, '-' as '_').
CONFIG_KEYS = ("socket", "lun", "directory", "size", "mode", "group", "pid_file", "ports",
               "nbd", "export", "threads")
SUN_PATH_MAX = 107          # sizeof(sockaddr_un.sun_path) - 1
STOP_TIMEOUT = 30.0          # seconds the server's loop has to end after shutdown()
PROBE_TIMEOUT = 2.0         # seconds a live daemon has to answer the stale-socket probe

# The parent when this module was first imported, as early in the process as
# the package allows: --exit-with-parent compares it after PR_SET_PDEATHSIG
# to catch a parent that died before the request was made.
_START_PPID = os.getppid()


class ServeError(Exception):
    """A reason the daemon cannot start; ``status`` is the exit status
    (2: a mistake in the options or the configuration, 1: anything else)."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Log:
    """One line per event on stderr, prefixed ``cxlflash serve: `` (no
    timestamp: journald and test harnesses add their own).  A line is one
    ``write(2)`` of at most a few hundred bytes, so lines from the server's
    threads never interleave; a stderr that is closed or a broken pipe is
    ignored -- the daemon goes on serving without its log."""

    def __init__(self, fd=2, prefix=None):
        self.fd = fd
        self.prefix = PREFIX if prefix is None else prefix
        self._lock = threading.Lock()

    def __call__(self, message):
        text = self.prefix + " ".join(str(message).splitlines()) + "\n"
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                pass


# -- options and configuration -------------------------------------------------

def _mode(text):
    """A socket mode: an octal string ('0660', '660', '0o660') or, from TOML,
    an integer (write 0o660 there; 660 is a decimal number)."""
    if isinstance(text, bool):
        raise ValueError(f"not a mode: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        t = str(text).strip().lower()
        t = t[2:] if t.startswith("0o") else t
        if not t or any(c not in "01234567" for c in t):
            raise ValueError(f"not an octal mode: {text!r} (use e.g. 0660)")
        value = int(t, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(f"mode {text!r} is outside 0000..0777"
                         + (" (in TOML, write 0o660 or \"0660\")" if isinstance(text, int) else ""))
    return value


def _ports(text):
    if isinstance(text, bool):
        raise ValueError(f"not a number of ports: {text!r}")
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"not a number of ports: {text!r}") from None
    if not 1 <= n <= MAX_PORTS:
        raise ValueError(f"ports must be 1..{MAX_PORTS}, got {n}")
    return n


def _size(value):
    """Bytes: an integer, or a string with a suffix as ``--size`` takes."""
    from ..cli import _size as parse
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        import argparse
        try:
            n = parse(value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
    else:
        raise ValueError(f"not a size: {value!r}")
    if n <= 0 or n % 4096:
        raise ValueError(f"size {value!r} must be a positive multiple of 4096 bytes")
    return n


def _group(value):
    """A gid from a group name or number."""
    if isinstance(value, bool):
        raise ValueError(f"not a group: {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        gid = int(value)
        if gid < 0 or gid >= (1 << 32) - 1:
            raise ValueError(f"group id {gid} is out of range")
        return gid
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a group: {value!r}")
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"no group named {value!r} on this host") from None


def _checked(parse):
    """An argparse type from a parser raising ValueError."""
    import argparse

    def f(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    f.__name__ = parse.__name__.lstrip("_")
    return f


def add_parser(sub):
    """The ``serve`` subcommand on the ``cxlflash`` parser's subparsers."""
    import argparse
    checked = _checked

    s = sub.add_parser(
        "serve", help="run the driver as a daemon that other processes connect to",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the cxlflash driver in this process, in the foreground, "
                    "serving every process that connects to its Unix socket "
                    "(cxlflash.connect(PATH)).  With no --lun, one in-memory LUN "
                    "of --size bytes.",
        epilog="""\
Readiness: once the socket accepts, the pid file is written and READY=1 is
sent on $NOTIFY_SOCKET (systemd Type=notify).  Socket activation
(LISTEN_FDS) is accepted.  SIGTERM, SIGINT or SIGHUP stop it: every context
is released, every LUN closed, the socket and the pid file removed; exit 0.
A restart is like reloading the kernel driver: clients' contexts are gone.
Exit status 1: it could not start; 2: a mistake in the options or --config.""")
    s.add_argument("--socket", metavar="PATH",
                   help="the Unix socket to serve (default: $CXLFLASH_SOCKET, else "
                        "$XDG_RUNTIME_DIR/cxlflash.sock, else /run/cxlflash/cxlflash.sock)")
    s.add_argument("--lun", metavar="FILE_DEVICE_OR_RBD", action="append", default=None,
                   help="a physical LUN: an existing, non-empty file, a block "
                        "device, or an RBD image rbd:POOL/IMAGE[?conf=PATH][&id=NAME]"
                        "[&timeout=SECONDS] (repeat for more LUNs)")
    s.add_argument("--directory", metavar="DIR",
                   help="where LUNs provisioned by clients are kept as files "
                        "(default: in memory)")
    s.add_argument("--config", metavar="FILE.toml",
                   help="the same settings in TOML (keys: " + ", ".join(CONFIG_KEYS)
                        + "); options given on the command line win")
    s.add_argument("--size", type=checked(_size), default=None,
                   help="the in-memory LUN's size when there is no --lun "
                        "(default 4G; suffixes k, M, G, T)")
    s.add_argument("--mode", type=checked(_mode), default=None,
                   help="the socket's permissions, octal (default 0660)")
    s.add_argument("--group", type=checked(_group), default=None, metavar="NAME|GID",
                   help="the socket's group (default: the daemon's)")
    s.add_argument("--pid-file", metavar="PATH",
                   help="written with the pid when ready, locked while running, "
                        "removed at exit")
    s.add_argument("--exit-with-parent", action="store_true",
                   help="stop (as on SIGTERM) when the parent process exits "
                        "(for test harnesses)")
    s.add_argument("--ports", type=checked(_ports), default=None, metavar="N",
                   help=f"the adapter's FC ports, 1..{MAX_PORTS} (default 2); every "
                        "LUN is visible on all of them")
    g = s.add_argument_group("NBD export (qemu, nbdcopy, fio, nbd-client)")
    g.add_argument("--nbd", metavar="unix:PATH|tcp:[HOST:]PORT", action="append",
                   type=checked(_nbd_address), default=None,
                   help="also serve --export's over NBD there (repeatable; TCP host "
                        "default 127.0.0.1)")
    _export_options(g, checked)
    return s


def _nbd_address(text):
    from .nbd import parse_listen
    return parse_listen(text)


def _nbd_export(text):
    from .nbd import parse_export
    return parse_export(text)


def _threads(text):
    n = int(text)
    if not 1 <= n <= 256:
        raise ValueError(f"{text}: 1..256")
    return n


def _export_options(g, checked=_checked):
    g.add_argument("--export", metavar="NAME=SIZE|NAME=direct", action="append",
                   type=checked(_nbd_export), default=None,
                   help="an export: a new virtual LUN of SIZE bytes (suffixes K, M, G, "
                        "T), or 'direct' for the whole physical LUN; clients name it "
                        "nbd+unix:///NAME?socket=PATH (repeatable)")
    g.add_argument("--threads", type=checked(_threads), default=None, metavar="N",
                   help="requests of one NBD connection served at once (default 16)")


def add_nbd_parser(sub):
    """The ``nbd`` subcommand: a driver of its own, exporting new LUNs."""
    import argparse
    checked = _checked

    s = sub.add_parser(
        "nbd", help="export new LUNs over NBD (qemu, nbdcopy, fio, nbd-client)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a driver in this process, create one virtual LUN per "
                    "--export on --target (default: an in-memory LUN just large "
                    "enough), and serve them over the Network Block Device protocol "
                    "until stopped.",
        epilog="""Examples:
  cxlflash nbd --unix /tmp/nbd.sock --export disk=10G
  qemu-img convert -O raw 'nbd+unix:///disk?socket=/tmp/nbd.sock' disk.img
  nbdcopy image.raw 'nbd+unix:///disk?socket=/tmp/nbd.sock'
  cxlflash nbd --tcp 127.0.0.1:10809 --export whole=direct --target /dev/sdX

Readiness: once the sockets accept, the pid file is written and READY=1 is
sent on $NOTIFY_SOCKET.  SIGTERM or SIGINT stop it (exit 0): connections
end, the LUNs are released, the sockets and the pid file removed.  An
export keeps the size its clients were told until they reconnect.""")
    s.add_argument("--unix", metavar="PATH", help="serve on this Unix socket")
    s.add_argument("--tcp", metavar="[HOST:]PORT", type=checked(_hostport),
                   help="serve on TCP (host default 127.0.0.1)")
    _export_options(s, checked)
    s.add_argument("--target", metavar="FILE_DEVICE_OR_RBD",
                   help="the physical LUN the exports are made on: an existing file, "
                        "a block device, or an RBD image rbd:POOL/IMAGE[?conf=PATH]"
                        "[&id=NAME][&timeout=SECONDS] (default: memory)")
    s.add_argument("--pid-file", metavar="PATH",
                   help="written with the pid when ready, removed at exit")
    s.add_argument("--exit-with-parent", action="store_true",
                   help="stop (as on SIGTERM) when the parent process exits")
    return s


def _hostport(text):
    from .nbd import parse_hostport
    return parse_hostport(text)


def default_socket():
    """Where a daemon serves when no --socket (or config) says: where
    ``cxlflash.connect()`` looks ($CXLFLASH_SOCKET, else
    $XDG_RUNTIME_DIR/cxlflash.sock, else /run/cxlflash/cxlflash.sock)."""
    from .client import default_socket as where
    return where()


def _load_toml(path):
    try:
        import tomllib as toml
    except ImportError:     # Python < 3.11
        try:
            import tomli as toml  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ImportError:
            raise ServeError(f"--config {path}: reading TOML needs Python 3.11 (tomllib) "
                             "or the tomli package (pip install tomli)", 2) from None
    try:
        with open(path, "rb") as f:
            return toml.load(f)
    except FileNotFoundError:
        raise ServeError(f"--config {path}: no such file", 2) from None
    except IsADirectoryError:
        raise ServeError(f"--config {path}: is a directory", 2) from None
    except PermissionError:
        raise ServeError(f"--config {path}: permission denied", 2) from None
    except toml.TOMLDecodeError as e:
        raise ServeError(f"--config {path}: not valid TOML: {e}", 2) from None


def read_config(path):
    """The settings of a configuration file, checked: {key: value}.  Relative
    paths in it are relative to the file's directory."""
    data = _load_toml(path)
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ServeError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})", 2)
    base = os.path.dirname(os.path.abspath(path))

    def a_path(key, v):
        if not isinstance(v, str) or not v:
            raise ServeError(f"--config {path}: {key} must be a path (a non-empty "
                             f"string), got {v!r}", 2)
        return os.path.join(base, os.path.expanduser(v))

    out = {}
    for key, v in data.items():
        try:
            if key in ("socket", "directory", "pid_file"):
                out[key] = a_path(key, v)
            elif key == "lun":
                items = [v] if isinstance(v, str) else v
                if not isinstance(items, list):
                    raise ServeError(f"--config {path}: lun must be a path or a list "
                                     f"of paths, got {v!r}", 2)
                out[key] = [a_path("lun", x) for x in items]
            elif key == "size":
                out[key] = _size(v)
            elif key == "mode":
                out[key] = _mode(v)
            elif key == "group":
                out[key] = _group(v)
            elif key == "ports":
                if not isinstance(v, int):
                    raise ValueError(f"not a number of ports: {v!r}")
                out[key] = _ports(v)
            elif key in ("nbd", "export"):
                items = [v] if isinstance(v, str) else v
                if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                    raise ValueError(f"a string or a list of strings, got {v!r}")
                parse = _nbd_address if key == "nbd" else _nbd_export
                out[key] = [parse(x) for x in items]
                if key == "nbd":
                    out[key] = [("unix", os.path.join(base, a)) if k == "unix" else (k, a)
                                for k, a in out[key]]
            elif key == "threads":
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ValueError(f"a number of threads, got {v!r}")
                out[key] = _threads(str(v))
        except ValueError as e:
            raise ServeError(f"--config {path}: {key}: {e}", 2) from None
    return out


class Settings:
    """What the daemon serves: the options over the configuration file over
    the defaults."""

    def __init__(self, args):
        conf = read_config(args.config) if args.config else {}

        def pick(key, attr=None):
            v = getattr(args, attr or key)
            return v if v is not None else conf.get(key)

        self.notes = []             # warnings for the log, once it starts
        self.socket = pick("socket")
        self.luns = pick("lun")
        self.directory = pick("directory")
        self.size = pick("size")
        self.mode = pick("mode")
        self.group = pick("group")
        self.pid_file = pick("pid_file")
        self.ports = pick("ports") or 2
        self.exit_with_parent = bool(getattr(args, "exit_with_parent", False))
        self.control = True             # serve cxlflash.connect() clients
        self.nbd = [("unix", os.path.abspath(a)) if k == "unix" else (k, a)
                    for k, a in (pick("nbd") or [])]
        self.exports = pick("export") or []
        self.threads = pick("threads")
        _check_exports(self.exports, bool(self.nbd), "--nbd")
        # What only applies to a socket this daemon creates (named for the
        # log when socket activation makes them moot).
        self.socket_options = [o for o, v in (("--socket", self.socket),
                                              ("--mode", self.mode),
                                              ("--group", self.group)) if v is not None]
        if self.mode is None:
            self.mode = DEFAULT_MODE
        if self.luns and self.size is not None:
            raise ServeError("--size is the size of the in-memory LUN served when there "
                             "is no --lun: leave it out (a LUN file has its own size)", 2)
        if self.size is None:
            self.size = DEFAULT_SIZE
        self.luns = [_lun_path(p) for p in (self.luns or [])]
        self._check_luns()
        if self.directory is not None and not os.path.isdir(self.directory):
            raise ServeError(f"--directory {self.directory}: no such directory "
                             "(create it first)", 2)

    lun_option = "--lun"

    def _check_luns(self):
        seen = {}
        for p in self.luns:
            if is_rbd(p):
                try:
                    opts = parse_rbd(p)
                except CxlFlashError as e:
                    raise ServeError(f"{self.lun_option} {e.strerror}", 2) from None
                ident = ("rbd", opts["pool"], opts["image"])
                if ident in seen:
                    raise ServeError(f"LUN {p} is the same image as {seen[ident]}: each "
                                     "LUN once", 2)
                seen[ident] = p
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise ServeError(f"LUN {p} does not exist: create it first (e.g. "
                                 f"truncate -s 4G {p}), or leave out {self.lun_option} for an "
                                 "in-memory LUN", 2) from None
            except OSError as e:
                raise ServeError(f"LUN {p}: {e.strerror}", 2) from None
            if stat.S_ISBLK(st.st_mode):
                ident = ("dev", st.st_rdev)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size < 4096:
                    raise ServeError(f"LUN {p} is {'empty' if not st.st_size else 'smaller than one 4096-byte block'} "
                                     f"({st.st_size} bytes): give it a size first "
                                     f"(e.g. truncate -s 4G {p})", 2)
                if st.st_size % 4096:
                    self.notes.append(f"LUN {p}: its last {st.st_size % 4096} bytes are "
                                      "not a whole 4096-byte block and are not served")
                ident = ("file", st.st_dev, st.st_ino)
            else:
                raise ServeError(f"LUN {p} is neither a regular file nor a block device", 2)
            if ident in seen:
                raise ServeError(f"LUN {p} is the same {'device' if ident[0] == 'dev' else 'file'} "
                                 f"as {seen[ident]}: each LUN once (two LUNs on one store "
                                 "would overwrite each other)", 2)
            seen[ident] = p


def _lun_path(p):
    """A --lun/--target as the daemon opens it: an RBD name as it is, a
    path made absolute."""
    return p if is_rbd(p) else os.path.abspath(p)


def _check_exports(exports, listening, where):
    names = [n for n, _ in exports]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ServeError(f"--export {dup[0]!r} given twice: each export needs its own name", 2)
    if exports and not listening:
        raise ServeError(f"--export needs {where}: where clients connect", 2)
    if listening and not exports:
        raise ServeError(f"{where} serves --export's: give at least one "
                         "(--export NAME=SIZE, e.g. disk=1G)", 2)
    direct = [n for n, size in exports if size is None]
    if direct and len(exports) > 1:
        raise ServeError(f"--export {direct[0]}=direct is the whole LUN: it cannot share "
                         "it with other exports", 2)


class NbdSettings:
    """``cxlflash nbd``: a driver of its own for its exports."""

    def __init__(self, args):
        from .._core.tables import MC_CHUNK_SIZE
        chunk_bytes = MC_CHUNK_SIZE * 4096      # the in-memory LUN's blocks are 4 KiB
        self.notes = []
        self.socket = None
        self.control = False
        self.socket_options = []
        self.directory = None
        self.mode = None
        self.group = None
        self.ports = 1
        self.pid_file = args.pid_file
        self.exit_with_parent = bool(args.exit_with_parent)
        self.nbd = []
        if args.unix:
            self.nbd.append(("unix", os.path.abspath(args.unix)))
        if args.tcp:
            self.nbd.append(("tcp", args.tcp))
        if not self.nbd:
            raise ServeError("where should clients connect? give --unix PATH and/or "
                             "--tcp [HOST:]PORT", 2)
        self.exports = args.export or []
        self.threads = args.threads
        _check_exports(self.exports, True, "--unix/--tcp")
        self.luns = [_lun_path(args.target)] if args.target else []
        if self.luns:
            self._check_luns()
            self.size = None
        else:
            if any(size is None for _, size in self.exports):
                raise ServeError("--export NAME=direct exports a whole physical LUN: "
                                 "give it one with --target FILE_OR_DEVICE", 2)
            # Just large enough: each export in whole chunks of 4096-byte blocks.
            self.size = sum(-(-size // chunk_bytes) for _, size in self.exports) * chunk_bytes

    lun_option = "--target"
    _check_luns = Settings._check_luns


# -- process -----------------------------------------------------------------

def exit_with_parent():
    """PR_SET_PDEATHSIG(SIGTERM); False when the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise ServeError(f"--exit-with-parent: prctl(PR_SET_PDEATHSIG) failed: "
                         f"{os.strerror(e)}")
    # The parent may have died before prctl: then no signal will ever come.
    return os.getppid() == _START_PPID


def notify(state, log):
    """Send ``state`` to systemd's $NOTIFY_SOCKET (sd_notify without the
    library); nothing when it is not set.  True when sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        target = "\0" + addr[1:]            # the abstract namespace
    elif addr[0] == "/":
        target = addr
    else:
        log(f"NOTIFY_SOCKET={addr!r} is not a Unix socket path: readiness not sent")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), target)
    except OSError as e:
        log(f"cannot notify {addr}: {e.strerror or e}")
        return False
    return True


class PidFile:
    """The pid file, locked (flock, exclusive) from the start to the end of
    the process: a second daemon with the same pid file is refused before
    it touches anything else.  Empty until ``write`` (readiness)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o644)
            except OSError as e:
                raise ServeError(f"pid file {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise ServeError(
                    f"pid file {self.path} is locked by pid {holder}: a daemon with this "
                    "pid file is running" if holder.isdigit() else
                    f"pid file {self.path} is locked by another cxlflash serve that is "
                    "starting") from None
            # The daemon that held it may have removed it between our open and
            # our lock: then we locked a file nobody else can find.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)          # a pid left by a daemon killed -9 is not ours

    def write(self, pid):
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def remove(self):
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _is_listening_unix_stream(sock):
    return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)


class Listener:
    """The listening socket: ``sock``, ``name`` (for the log) and
    ``close()`` (which unlinks the path if, and only if, this daemon
    created it and it is still the one it created)."""

    sock = None
    path = None
    _ident = None

    @classmethod
    def activated(cls, log):
        """The socket systemd passed (LISTEN_PID == our pid, LISTEN_FDS >=
        1: fd 3), or None.  The variables are removed from the environment
        either way, as sd_listen_fds(1) does."""
        pid, fds = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
        if pid is None or fds is None:
            return None
        try:
            pid, n = int(pid), int(fds)
        except ValueError:
            raise ServeError(f"socket activation: LISTEN_PID={pid!r} LISTEN_FDS={fds!r} "
                             "are not numbers") from None
        if pid != os.getpid():
            log(f"LISTEN_PID={pid} is not this process ({os.getpid()}): socket "
                "activation ignored")
            return None
        if n < 1:
            return None
        try:
            sock = socket.socket(fileno=3)
        except OSError as e:
            raise ServeError(f"socket activation: fd 3 is not a socket ({e.strerror})") from None
        if not _is_listening_unix_stream(sock):
            sock.detach()
            raise ServeError("socket activation: fd 3 is not a listening AF_UNIX stream "
                             "socket (the .socket unit needs ListenStream=/a/path and "
                             "Accept=no)")
        os.set_inheritable(3, False)
        for fd in range(4, 3 + n):      # sockets we were given and do not serve
            try:
                os.close(fd)
            except OSError:
                pass
        if n > 1:
            log(f"socket activation passed {n} sockets: serving the first (fd 3), "
                f"closed the other {n - 1}")
        self = cls()
        self.sock = sock
        sock.setblocking(True)
        try:
            name = sock.getsockname()
        except OSError:
            name = ""
        if isinstance(name, bytes):
            name = "@" + name[1:].decode("utf-8", "replace") if name[:1] == b"\0" else \
                name.decode("utf-8", "replace")
        self.name = f"{name or '(unnamed)'} (fd 3, socket activation)"
        return self

    @classmethod
    def bound(cls, path, mode, gid, log):
        """A socket bound at ``path``, given ``mode`` and ``gid``, then
        listening.  A live daemon's socket is never taken; a stale one (no
        one answers) is replaced; anything else at the path is an error."""
        path = os.path.abspath(path)
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ServeError(f"socket path {path} is {len(os.fsencode(path))} bytes: a Unix "
                             f"socket path has at most {SUN_PATH_MAX}; choose a shorter one")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ServeError(f"cannot create the socket {path}: directory {parent} does not "
                             "exist (create it, e.g. RuntimeDirectory=cxlflash in the unit)")
        self = cls()
        # Two daemons started at once on one path: the check, the unlink of a
        # stale socket and the bind+listen happen under a lock on the
        # directory, so the second sees the first's live socket.
        try:
            dirfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            dirfd = None            # no read permission on the directory: no lock
        try:
            if dirfd is not None:
                fcntl.flock(dirfd, fcntl.LOCK_EX)
            self._evict_stale(path, log)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as e:
                sock.close()
                raise ServeError(f"cannot create the socket {path}: {e.strerror}") from None
            try:
                st = os.lstat(path)
                self._ident = (st.st_dev, st.st_ino)
                self.path = path
                self.sock = sock
                # Not yet listening, so no one can connect while the mode is
                # the umask's; chmod after bind, so the umask cannot change it.
                os.chmod(path, mode)
                if gid is not None:
                    try:
                        os.chown(path, -1, gid)
                    except PermissionError:
                        raise ServeError(f"cannot give the socket {path} group {gid}: "
                                         "permission denied (the daemon's user must be "
                                         "in that group)") from None
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                self.close()
                raise
        finally:
            if dirfd is not None:
                os.close(dirfd)
        group = f", group {grp.getgrgid(gid).gr_name if _has_gid(gid) else gid}" \
            if gid is not None else ""
        self.name = f"{path} (mode {mode:04o}{group})"
        return self

    @staticmethod
    def _evict_stale(path, log):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServeError(f"{path} exists and is not a socket: remove it or choose "
                             "another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ServeError(f"cannot remove the stale socket {path}: {e.strerror}") from None
            log(f"removed the stale socket {path} (no daemon answered)")
            return
        except FileNotFoundError:
            return
        except socket.timeout:
            raise ServeError(f"a daemon already serves {path} (it did not accept within "
                             f"{PROBE_TIMEOUT:g} s): stop it first, or choose another "
                             "--socket") from None
        except OSError as e:
            raise ServeError(f"cannot tell whether a daemon serves {path}: {e.strerror}") from None
        finally:
            probe.close()
        raise ServeError(f"a daemon already serves {path}: stop it first, or choose "
                         "another --socket")

    def unlink(self):
        """Remove the path we bound, if it is still ours (another daemon may
        have replaced it since)."""
        path, self.path = self.path, None
        if path is None:
            return
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(path)
        except OSError:
            pass

    def close(self):
        self.unlink()
        if self.sock is not None:
            self.sock.close()


def _has_gid(gid):
    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


# -- the daemon ---------------------------------------------------------------

def _signal_name(signo):
    try:
        return signal.Signals(signo).name
    except ValueError:
        return str(signo)


class Daemon:
    def __init__(self, settings, log):
        self.settings = settings
        self.log = log
        self.adapter = None
        self.listener = None
        self.pid_file = None
        self.server = None
        self.thread = None
        self.server_error = None
        self.nbd = None

    def _stop_pending(self):
        pending = signal.sigpending() & set(STOP_SIGNALS)
        if pending:
            signo = signal.sigtimedwait(pending, 0)
            return signo.si_signo if signo is not None else min(pending)
        return None

    def _adapter(self):
        import cxlflash
        s = self.settings
        adapter = cxlflash.Adapter(s.directory, ports=s.ports)
        try:
            ports = tuple(range(s.ports))
            for p in s.luns:
                wwid = adapter.add_lun(p, ports=ports)
                self.log(f"LUN {wwid.hex()}: {p}")
            if not s.luns:
                wwid = adapter.add_lun(None, size=s.size, ports=ports)
                self.log(f"LUN {wwid.hex()}: memory, {_bytes(s.size)}")
        except BaseException:
            adapter.close()
            raise
        return adapter

    def _serve(self):
        try:
            self.server.serve_forever()
        except BaseException as e:         # noqa: B036 -- reported by the main thread
            self.server_error = e

    def run(self):
        """Start, serve until a stop signal, stop.  The exit status."""
        s = self.settings
        try:
            if s.pid_file:
                self.pid_file = PidFile(s.pid_file)
            if s.control:
                self.listener = Listener.activated(self.log)
                if self.listener is not None and s.socket_options:
                    self.log(f"{', '.join(s.socket_options)} ignored: the socket comes "
                             "from socket activation (the .socket unit sets "
                             "ListenStream=, SocketMode=, SocketGroup=)")
                if self.listener is None:
                    self.listener = Listener.bound(s.socket or default_socket(), s.mode,
                                                   s.group, self.log)
                self.log(f"listening on {self.listener.name}")
            # Only now the LUNs: a daemon that already serves this socket may
            # have them open.
            for note in s.notes:
                self.log(note)
            self.adapter = self._adapter()
            if s.nbd:
                self._start_nbd()
            signo = self._stop_pending()
            if signo is None and s.control:
                from . import service
                self.server = service.Server(self.adapter, self.listener.sock, log=self.log)
                self.thread = threading.Thread(target=self._serve, name="cxlflash-serve",
                                               daemon=True)
                self.thread.start()
                signo = self._stop_pending()
            if signo is None:
                pid = os.getpid()
                if self.pid_file is not None:
                    self.pid_file.write(pid)
                self.log(f"ready: pid {pid}")
                notify(f"READY=1\nMAINPID={pid}", self.log)
                signo = self._wait()
            if signo is not None:
                self.log(f"stopping ({_signal_name(signo)})")
            else:
                self.log(f"the server stopped by itself: {self.server_error!r}")
            notify("STOPPING=1", self.log)
            return self._stop(0 if signo is not None else 1)
        except BaseException:
            self._stop(1, quiet=True)
            raise

    def _wait(self):
        """The stop signal that came, or None when the server's loop ended
        without one (an error)."""
        while True:
            info = signal.sigtimedwait(STOP_SIGNALS, 1.0)
            if info is not None:
                return info.si_signo
            if self.thread is not None and not self.thread.is_alive():
                return None

    def _log_held(self):
        """What closing the adapter releases: the contexts still held (the
        reaper may not have reached every closed connection yet)."""
        try:
            ctxs = self.server.status().get("contexts", [])
        except Exception:           # only a log line: never stop the stop
            return
        if ctxs:
            pids = sorted({c["pid"] for c in ctxs})
            chunks = sum(c.get("chunks", 0) for c in ctxs)
            self.log(f"releasing {len(ctxs)} context{'s' if len(ctxs) != 1 else ''} of "
                     f"pid{'s' if len(pids) != 1 else ''} {', '.join(map(str, pids))} "
                     f"({chunks} chunks)")

    def _start_nbd(self):
        from .nbd import NbdServer
        s = self.settings
        kw = {} if s.threads is None else {"threads": s.threads}
        self.nbd = NbdServer(self.adapter, log=self.log, **kw)
        for kind, addr in s.nbd:
            if kind == "unix":
                try:
                    self.nbd.listen_unix(addr)
                except OSError as e:
                    raise ServeError(f"cannot listen on unix:{addr}: {e.strerror} (the "
                                     "directory must exist and be writable)") from None
            else:
                try:
                    self.nbd.listen_tcp(*addr)
                except OSError as e:
                    raise ServeError(f"cannot listen on tcp:{addr[0]}:{addr[1]}: "
                                     f"{e.strerror} (choose another port)") from None
        for name, size in s.exports:
            self.nbd.add_export(name, size, direct=size is None)
        self.nbd.start()
        for a in self.nbd.addresses:
            self.log(f"NBD on {a}")

    def _stop(self, status, quiet=False):
        """Stop everything started, in order; the exit status."""
        if self.listener is not None:
            self.listener.unlink()      # new clients: ENOENT, and a new daemon may bind
        if self.nbd is not None:
            try:
                self.nbd.close()
            except Exception as e:
                self.log(f"error stopping the NBD server: {e!r}")
                status = 1
            self.nbd = None
        if self.server is not None:
            try:
                self.server.shutdown()
            except Exception as e:
                self.log(f"error in shutdown: {e!r}")
                status = 1
            if self.thread is not None:
                self.thread.join(STOP_TIMEOUT)
                if self.thread.is_alive():
                    self.log(f"the server did not stop within {STOP_TIMEOUT:g} s: "
                             "closing the adapter under it")
                    status = 1
            self._log_held()
            self.server = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.adapter is not None:
            try:
                self.adapter.close()
            except Exception as e:
                self.log(f"error closing the adapter: {e!r}")
                status = 1
            self.adapter = None
        if self.pid_file is not None:
            self.pid_file.remove()
            self.pid_file = None
        if not quiet:
            self.log("stopped")
        return status


def _bytes(n):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:g} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def standard_fds():
    """Make sure fds 0, 1 and 2 are open (on /dev/null where they were
    closed, e.g. ``cxlflash serve 2>&-``): otherwise the next socket or LUN
    opened would get fd 2, and the log would be written into a client's
    connection or onto a LUN's data."""
    opened = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDWR)
            if fd > 2:
                os.close(fd)
                break
            opened.append(fd)
    except OSError:
        pass
    return opened


def run_nbd(args):
    """``cxlflash nbd``: the exit status."""
    return run(args, NbdSettings, "cxlflash nbd")


def run(args, settings_class=None, what="cxlflash serve"):
    """``cxlflash serve``: the exit status."""
    standard_fds()
    log = Log(prefix=f"{what}: ")
    try:
        settings = (settings_class or Settings)(args)
        # Before any thread exists, so every thread inherits the mask: the
        # stop signals are only ever taken by the main thread's
        # sigtimedwait.  They stay blocked until the process exits: a second
        # SIGTERM while the daemon stops does not cut the stop short.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if settings.exit_with_parent and not exit_with_parent():
            log("the parent process is gone: not starting (--exit-with-parent)")
            return 0
        return Daemon(settings, log).run()
    except ServeError as e:
        log(f"error: {e}")
        return e.status
    except OSError as e:
        # The driver's own errors (CxlFlashError) say what to do.
        log(f"error: {e.strerror or e}" if e.filename is None else f"error: {e}")
        return 1
