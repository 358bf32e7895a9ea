"""Export LUNs over the Network Block Device protocol.

    srv = NbdServer(adapter)                 # an embedded adapter
    srv.add_export("disk", 1 << 30)          # a virtual LUN of the first LUN
    srv.listen_unix("/run/cxlflash/nbd.sock")
    srv.start()                              # clients: nbd+unix:///disk?socket=...
    ...
    srv.close()

An export is a LUN object (VirtualLun, or DirectLun for ``direct=True``)
held by a context of its own, attached by this server like any other
process's: its chunks come from the shared allocator.

The handshake (fixed newstyle, the options of doc/proto.md) is here, in
Python, with every length and field checked before use; a client that
breaks the protocol loses its connection and nothing else.  The
transmission phase runs in ``cxlflash._core.nbd`` without the GIL: one
connection is served by ``threads`` worker threads, so that many requests
of one client are in flight at once (replies go out as they finish).

An export's size is what a client is told when it connects, and stays that
for the connection (NBD has no resize notice): :meth:`resize_export` grows
an export for clients that connect afterwards, and refuses (EBUSY) to
shrink it below the size a connected client was told.
"""
import errno
import os
import socket
import struct
import threading

from .._core.nbd import NbdConnection, NbdExport, MAX_PAYLOAD
from .. import _args
from ..errors import CxlFlashError

# -- protocol numbers (doc/proto.md) ---------------------------------------------------

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

BASE_ALLOCATION = "base:allocation"
META_ID_BASE_ALLOCATION = 1

OFF_MAX = (1 << 63) - 1

#: Advertised block sizes: any alignment is served (partial blocks are
#: read-modify-written); 4 KiB is what is cheap; 32 MiB the largest payload.
BLOCK_MIN, BLOCK_PREFERRED, BLOCK_MAX = 1, 4096, MAX_PAYLOAD

#: Option data longer than this closes the connection (names are at most
#: 4096 bytes; a SET_META_CONTEXT with many queries stays far below).
MAX_OPTION = 64 * 1024
MAX_NAME = 4096
#: Seconds a client has for the whole handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Worker threads per connection: requests of one client in flight at once.
DEFAULT_THREADS = 16
#: Connections served at once; more are refused (closed) and logged.
MAX_CONNECTIONS = 256

_OPT = struct.Struct(">QII")
_REPLY = struct.Struct(">QIII")


class ProtocolError(Exception):
    """The client broke the protocol: its connection closes."""


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text):
    """A size in bytes: digits with an optional K/M/G/T suffix (binary:
    1K = 1024); ValueError otherwise, or when it is 0."""
    t = str(text).strip().upper()
    if t.endswith("IB"):
        t = t[:-2]
    elif t.endswith("B") and len(t) > 1 and t[-2] in "KMGT":
        t = t[:-1]
    mult = 1
    if t and t[-1] in "KMGT":
        mult = _SUFFIXES[t[-1]]
        t = t[:-1]
    if not t.isdigit() or not t.isascii():
        raise ValueError(f"not a size: {text!r} (bytes, or with a K/M/G/T suffix: 512M)")
    n = int(t) * mult
    if n <= 0:
        raise ValueError(f"a size of 0: {text!r}")
    return n


def parse_export(text):
    """``NAME=SIZE`` or ``NAME=direct`` -> (name, size or None)."""
    name, sep, what = str(text).partition("=")
    if not sep or not name:
        raise ValueError(f"not an export: {text!r} (NAME=SIZE, e.g. disk=1G, or "
                         "NAME=direct)")
    check_name(name)
    if what.strip().lower() == "direct":
        return name, None
    return name, parse_size(what)


def check_name(name):
    """An export name: a str of at most 4096 bytes of UTF-8, without NUL
    (TypeError / ValueError)."""
    if not isinstance(name, str):
        raise TypeError(f"an export name is a str, not {type(name).__name__}")
    try:
        b = name.encode("utf-8", "strict")
    except UnicodeEncodeError:
        raise ValueError("an export name must be valid UTF-8") from None
    if len(b) > MAX_NAME or "\0" in name:
        raise ValueError(f"an export name must be at most {MAX_NAME} bytes of UTF-8 "
                         "without NUL")
    return name


def _export_size(size):
    """Bytes, 1..2**63-1: TypeError / CxlFlashError(EINVAL)."""
    v = _args.integer(size, "size")
    if not 1 <= v <= OFF_MAX:
        raise CxlFlashError(errno.EINVAL, f"an export's size is 1..2**63-1 bytes, "
                            f"got {v}")
    return v


def parse_listen(text):
    """``unix:PATH`` or ``tcp:[HOST:]PORT`` -> ("unix", path) or ("tcp", (host, port))."""
    kind, sep, rest = str(text).partition(":")
    if sep and kind == "unix" and rest:
        return "unix", rest
    if sep and kind == "tcp" and rest:
        return "tcp", parse_hostport(rest)
    raise ValueError(f"not an NBD address: {text!r} (unix:PATH or tcp:[HOST:]PORT)")


def parse_hostport(text):
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a TCP port: {text!r} ([HOST:]PORT, PORT 0..65535)")
    return host, int(port)


def _peer_name(sock, peer, listener):
    """For the log: ``pid N`` on a Unix socket, HOST:PORT on TCP."""
    if sock.family == socket.AF_UNIX:
        try:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return f"pid {pid} on {listener}"
        except OSError:
            return listener
    return f"{peer[0]}:{peer[1]}" if peer else listener


class Export:
    """One export: ``name``, ``size`` (bytes, what new clients are told),
    ``lun`` (the VirtualLun or DirectLun), ``context``, ``direct``."""

    def __init__(self, name, lun, context, size, direct, description=""):
        self.name = name
        self.lun = lun
        self.context = context
        self.size = size
        self.direct = direct
        self.description = description
        self.core = NbdExport(lun)
        self.connections = set()        # NbdConnection objects being served
        self.told = {}                  # handshake -> the size GO/EXPORT_NAME sent it

    def flags(self, structured):
        f = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM
             | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN | TF_SEND_CACHE
             | TF_SEND_FAST_ZERO)
        if structured:
            f |= TF_SEND_DF
        return f


class NbdServer:
    """Serves exports of ``adapter`` (an embedded ``cxlflash.Adapter``) to
    NBD clients on Unix and TCP sockets.  ``log``: a callable taking one
    line, or None."""

    def __init__(self, adapter, *, threads=DEFAULT_THREADS, log=None):
        if adapter.connected:
            raise CxlFlashError(errno.EINVAL, "the NBD server runs the driver's data "
                                "path itself: give it an embedded adapter (in the "
                                "daemon: cxlflash serve --nbd)")
        threads = _args.integer(threads, "threads")
        if not 1 <= threads <= 256:
            raise CxlFlashError(errno.EINVAL, f"threads is 1..256 worker threads per "
                                f"connection, got {threads}")
        self.adapter = adapter
        self.threads = threads
        self.log = log or (lambda line: None)
        self.exports = {}
        self._order = []
        self._lock = threading.Lock()
        self._listeners = []            # (socket, name, unix path or None)
        self._accepters = []
        self._handlers = {}             # connection thread -> its socket
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()

    # -- exports ---------------------------------------------------------------------

    def add_export(self, name, size=None, *, direct=False, lun=None, description=""):
        """Export a new virtual LUN of ``size`` bytes (rounded up to whole
        blocks; exported as ``size`` bytes) on the physical LUN ``lun`` (a
        WWID; default: the first), or with ``direct=True`` the whole
        physical LUN.  Returns the :class:`Export`."""
        check_name(name)
        if direct:
            if size is not None:
                raise ValueError("a direct export is the whole LUN: no size")
        else:
            size = _export_size(size)
        with self._lock:
            if name in self.exports:
                raise CxlFlashError(errno.EEXIST, f"an export named {name!r} exists")
        luns = self.adapter.luns()
        if lun is None:
            if not luns:
                raise CxlFlashError(errno.ENODEV, "the adapter has no LUN to export "
                                    "(add one: Adapter.add_lun)")
            lun = luns[0]
        disk = self.adapter.open_disk(lun)
        ctx = None
        try:
            ctx = disk.attach()
            if direct:
                obj = ctx.open_direct()
                size = obj.size * obj.block_size
            else:
                obj = ctx.create_virtual(0)
                obj.set_size(-(-size // obj.block_size))
            export = Export(name, obj, ctx, size, direct, description)
        except BaseException:
            if ctx is not None:
                ctx.close()
            raise
        with self._lock:
            if name in self.exports:
                ctx.close()
                raise CxlFlashError(errno.EEXIST, f"an export named {name!r} exists")
            self.exports[name] = export
            self._order.append(name)
        self.log(f"export {name!r}: {'direct, ' if direct else ''}{size} bytes "
                 f"on LUN {lun.hex()}")
        return export

    def resize_export(self, name, size):
        """Set a virtual export's size in bytes.  Clients connected keep the
        size they were told; shrinking below it while one is connected is
        EBUSY."""
        with self._lock:
            export = self.exports.get(name)
            if export is None:
                raise CxlFlashError(errno.ENOENT, f"no export named {name!r}")
            if export.direct:
                raise CxlFlashError(errno.EINVAL, f"export {name!r} is a whole LUN: "
                                    "resize the LUN")
            size = _export_size(size)
            told = max([c.size for c in export.connections] + list(export.told.values()),
                       default=0)
            if size < told:
                raise CxlFlashError(errno.EBUSY, f"export {name!r} is {told} bytes for "
                                    f"{len(export.connections)} connected client(s): "
                                    "it cannot shrink below that until they disconnect")
            bs = export.lun.block_size
            export.lun.set_size(-(-size // bs), release=True)
            export.size = size
        self.log(f"export {name!r}: now {size} bytes (for new connections)")

    def _find(self, name):
        with self._lock:
            if name == "" and self._order:
                name = self._order[0]
            return self.exports.get(name)

    # -- sockets -----------------------------------------------------------------------

    def listen_unix(self, path):
        """Listen on a Unix socket at ``path`` (a stale socket file there is
        replaced; anything else is EEXIST).  Returns the path."""
        path = os.fspath(path)
        try:
            import stat
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise CxlFlashError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2.0)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)         # nobody listens: stale
            except socket.timeout:
                raise CxlFlashError(errno.EADDRINUSE, f"{path}: a server listens there "
                                    "(it did not accept within 2 s): stop it, or choose "
                                    "another path") from None
            else:
                raise CxlFlashError(errno.EADDRINUSE, f"{path}: another server listens "
                                    "there (stop it, or choose another path)")
            finally:
                probe.close()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            s.listen(128)
        except BaseException:
            s.close()
            raise
        self._listeners.append((s, f"unix:{path}", path))
        return path

    def listen_tcp(self, host="127.0.0.1", port=0):
        """Listen on TCP; returns the (host, port) bound (port 0: any)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
        except BaseException:
            s.close()
            raise
        bound = s.getsockname()[:2]
        self._listeners.append((s, f"tcp:{bound[0]}:{bound[1]}", None))
        return bound

    @property
    def addresses(self):
        return [name for _, name, _ in self._listeners]

    def start(self):
        """Accept connections (a thread per listening socket)."""
        for s, name, _ in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(s, name),
                                 name=f"cxlflash-nbd-accept {name}", daemon=True)
            self._accepters.append(t)
            t.start()

    def _accept_loop(self, s, name):
        import select
        while not self._stopping:
            try:
                r, _, _ = select.select([s, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._stopping:
                return
            if s not in r:
                continue
            try:
                c, peer = s.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if self._stopping:
                    return
                self.log(f"nbd: cannot accept a connection on {name}: {e.strerror}")
                select.select([], [], [], 0.1)
                continue
            with self._lock:
                busy = len(self._handlers) >= MAX_CONNECTIONS
            if busy:
                self.log(f"nbd: refusing a connection on {name}: {MAX_CONNECTIONS} "
                         "connections are being served")
                c.close()
                continue
            if c.family != socket.AF_UNIX:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            who = _peer_name(c, peer, name)
            t = threading.Thread(target=self._connection, args=(c, who),
                                 name="cxlflash-nbd-conn", daemon=True)
            with self._lock:
                self._handlers[t] = c
            t.start()

    # -- one connection ------------------------------------------------------------------

    def _connection(self, sock, who):
        conn = None
        export = None
        hs = _Handshake(self, sock)
        try:
            try:
                chosen = hs.run()
            except (ProtocolError, OSError, UnicodeError) as e:
                if not isinstance(e, ProtocolError) or str(e):
                    self.log(f"nbd: {who}: handshake ended: {e}")
                return
            if chosen is None:
                return
            export, size, structured, meta_id = chosen
            sock.settimeout(None)
            with self._lock:
                if self._stopping:
                    return
                conn = NbdConnection(sock.fileno(), export.core, size, structured, meta_id)
                export.connections.add(conn)
                export.told.pop(hs, None)
            self.log(f"nbd: {who}: serving {export.name!r} ({size} bytes, "
                     f"{'structured' if structured else 'simple'} replies)")
            workers = []
            try:
                for _ in range(self.threads - 1):
                    t = threading.Thread(target=conn.serve, name="cxlflash-nbd-worker",
                                         daemon=True)
                    t.start()
                    workers.append(t)
                conn.serve()
            finally:
                # Whatever happened, no worker may outlive the socket: its
                # fd number could be another connection's by then.
                if not conn.ended:
                    conn.abort()
                for t in workers:
                    t.join()
            why = conn.why
            self.log(f"nbd: {who}: {export.name!r}: {conn.requests} requests, "
                     f"{conn.errors} errors; {why or 'disconnected'}")
        except Exception as e:               # never take the server down
            self.log(f"nbd: {who}: connection failed: {e!r}")
        finally:
            with self._lock:
                if hs.bound is not None:
                    hs.bound.told.pop(hs, None)
                if conn is not None:
                    export.connections.discard(conn)
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._handlers.pop(threading.current_thread(), None)

    # -- stopping ------------------------------------------------------------------------

    def close(self):
        """Stop accepting, end every connection, release every export's
        context.  The adapter stays open."""
        if self._stopping and not self._listeners and not self.exports:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        for t in self._accepters:
            t.join(5)
        for s, _, path in self._listeners:
            s.close()
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._listeners = []
        with self._lock:
            conns = [c for e in self.exports.values() for c in e.connections]
            handlers = list(self._handlers.items())
        for c in conns:
            c.abort()
        for _, sock in handlers:         # those still in the handshake
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t, _ in handlers:
            t.join(10)
        with self._lock:
            exports, self.exports, self._order = list(self.exports.values()), {}, []
        for e in exports:
            try:
                e.context.close()
            except CxlFlashError as err:
                self.log(f"nbd: closing export {e.name!r}: {err}")
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Handshake:
    """The fixed-newstyle handshake of one client: returns (export, size,
    structured, meta_id) once it chose one, or None (it aborted)."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.structured = False
        self.meta_export = None         # the export SET_META_CONTEXT named
        self.meta_id = 0
        self.bound = None               # the export whose size GO/EXPORT_NAME sent

    def bind(self, export):
        """The size to tell a client that chose ``export``; until its
        connection is served (or fails) that size counts as told, so a
        shrink below it is EBUSY."""
        with self.server._lock:
            size = export.size
            export.told[self] = size
            self.bound = export
        return size

    def recv(self, n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ProtocolError("")     # the client went away
            got += k
        return bytes(buf)

    def reply(self, opt, rtype, data=b""):
        self.sock.sendall(_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    def error(self, opt, rtype, message):
        # At most 1024 bytes, cut between characters: still UTF-8.
        b = message.encode("utf-8", "replace")[:1024]
        self.reply(opt, rtype, b.decode("utf-8", "ignore").encode())

    def run(self):
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        self.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                      FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self.recv(4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(self.recv(16))
            if magic != IHAVEOPT:
                raise ProtocolError("an option without the IHAVEOPT magic")
            if length > MAX_OPTION:
                raise ProtocolError(f"option {opt}: {length} bytes of data (at most "
                                    f"{MAX_OPTION})")
            data = self.recv(length)
            if opt == OPT_EXPORT_NAME:
                export = self.server._find(data.decode("utf-8"))
                if export is None:
                    raise ProtocolError(f"EXPORT_NAME of an unknown export "
                                        f"{data[:64].decode(errors='replace')!r}")
                size = self.bind(export)
                self.sock.sendall(struct.pack(">QH", size, export.flags(self.structured))
                                  + (b"" if no_zeroes else bytes(124)))
                return export, size, self.structured, self._meta_for(export)
            if opt == OPT_ABORT:
                try:
                    self.reply(opt, REP_ACK)
                except OSError:
                    pass
                return None
            if opt == OPT_LIST:
                if length:
                    self.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                with self.server._lock:
                    names = list(self.server._order)
                for name in names:
                    b = name.encode()
                    self.reply(opt, REP_SERVER, struct.pack(">I", len(b)) + b)
                self.reply(opt, REP_ACK)
                continue
            if opt in (OPT_INFO, OPT_GO):
                chosen = self._info_go(opt, data)
                if chosen is not None:
                    return chosen
                continue
            if opt == OPT_STRUCTURED_REPLY:
                if length:
                    self.error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                self.structured = True
                self.reply(opt, REP_ACK)
                continue
            if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                self._meta(opt, data)
                continue
            self.error(opt, REP_ERR_UNSUP, f"option {opt} is not supported by this server")

    def _meta_for(self, export):
        return self.meta_id if self.meta_export is export else 0

    @staticmethod
    def _string(data, at, what):
        """A u32-length-prefixed UTF-8 string at ``at``: (text, next)."""
        if at + 4 > len(data):
            raise ValueError(f"{what}: truncated")
        (n,) = struct.unpack_from(">I", data, at)
        if n > MAX_NAME or at + 4 + n > len(data):
            raise ValueError(f"{what}: length {n} does not fit")
        return data[at + 4:at + 4 + n].decode("utf-8"), at + 4 + n

    def _info_go(self, opt, data):
        try:
            name, at = self._string(data, 0, "export name")
            if at + 2 > len(data):
                raise ValueError("the number of information requests is missing")
            (n,) = struct.unpack_from(">H", data, at)
            at += 2
            if at + 2 * n != len(data):
                raise ValueError(f"{n} information requests do not fit the data")
            wanted = set(struct.unpack_from(f">{n}H", data, at))
        except (ValueError, UnicodeDecodeError) as e:
            self.error(opt, REP_ERR_INVALID, f"a malformed request: {e}")
            return None
        export = self.server._find(name)
        if export is None:
            self.error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        size = self.bind(export) if opt == OPT_GO else export.size
        self.reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size,
                                              export.flags(self.structured)))
        if INFO_NAME in wanted:
            self.reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in wanted and export.description:
            self.reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                       + export.description.encode()[:MAX_NAME])
        self.reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, BLOCK_MIN,
                                              BLOCK_PREFERRED, BLOCK_MAX))
        self.reply(opt, REP_ACK)
        if opt == OPT_GO:
            return export, size, self.structured, self._meta_for(export)
        return None

    def _meta(self, opt, data):
        if opt == OPT_SET_META_CONTEXT:
            # SET replaces the selection, also when it fails.
            self.meta_export, self.meta_id = None, 0
        try:
            name, at = self._string(data, 0, "export name")
            if at + 4 > len(data):
                raise ValueError("the number of queries is missing")
            (n,) = struct.unpack_from(">I", data, at)
            at += 4
            queries = []
            for i in range(n):
                q, at = self._string(data, at, f"query {i}")
                queries.append(q)
            if at != len(data):
                raise ValueError("data after the last query")
        except (ValueError, UnicodeDecodeError) as e:
            self.error(opt, REP_ERR_INVALID, f"a malformed request: {e}")
            return
        if opt == OPT_SET_META_CONTEXT and not self.structured:
            self.error(opt, REP_ERR_INVALID, "NBD_OPT_SET_META_CONTEXT needs "
                       "NBD_OPT_STRUCTURED_REPLY first")
            return
        export = self.server._find(name)
        if export is None:
            self.error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == OPT_LIST_META_CONTEXT:
            match = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        else:
            match = BASE_ALLOCATION in queries
        if match:
            # LIST's ids are reserved (0); SET's is the one BLOCK_STATUS uses.
            b = BASE_ALLOCATION.encode()
            cid = META_ID_BASE_ALLOCATION if opt == OPT_SET_META_CONTEXT else 0
            self.reply(opt, REP_META_CONTEXT, struct.pack(">I", cid) + b)
        if opt == OPT_SET_META_CONTEXT:
            self.meta_export = export
            self.meta_id = META_ID_BASE_ALLOCATION if match else 0
        self.reply(opt, REP_ACK)
