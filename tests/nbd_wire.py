"""A small, strict NBD client for the protocol tests (stdlib only).

Everything is sent raw, so a test can send anything: ``send_option`` takes
an option number, its data and (to lie) its length; ``send_request`` any
magic, flags, type, cookie, offset and length, with or without the payload.
Everything read is parsed field by field and checked against the NBD
specification (doc/proto.md): magic numbers, option reply framing, chunk
types and lengths, chunk bounds and overlaps, the coverage of a successful
structured READ, block status descriptors.  A violation raises
``ProtocolViolation`` (an AssertionError) naming what the server sent.

    c = Conn.connect(path_or_host_port)
    c.greet()                                  # NBDMAGIC, IHAVEOPT, flags; sends client flags
    c.structured_reply()                       # NBD_OPT_STRUCTURED_REPLY -> ACK
    ctx = c.set_meta_context("disk", ["base:allocation"])
    info = c.go("disk", [INFO_BLOCK_SIZE])     # -> Info(size, flags, block_size, name)
    r = c.read(0, 4096)                        # -> Reply(.error, .data, .chunks, ...)
    c.write(0, b"x" * 512)
    c.disc()
"""
import errno
import socket
import struct
import time

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253         # oldstyle
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9
REP_ERR_EXT_HEADER_REQD = (1 << 31) + 10
REP_NAMES = {REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO",
             REP_META_CONTEXT: "META_CONTEXT", REP_ERR_UNSUP: "ERR_UNSUP",
             REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
             REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
             REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
             REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
             REP_ERR_TOO_BIG: "ERR_TOO_BIG",
             REP_ERR_EXT_HEADER_REQD: "ERR_EXT_HEADER_REQD"}

# NBD_REP_INFO information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Error values.
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = \
    1, 5, 12, 22, 28, 75, 95, 108
NBD_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

MAX_STRING = 4096


class ProtocolViolation(AssertionError):
    """The server sent something the specification does not allow."""


class Closed(Exception):
    """The server closed the connection (EOF or a reset) while the client
    was reading or writing."""


def _check(cond, what):
    if not cond:
        raise ProtocolViolation(what)


class OptReply:
    __slots__ = ("opt", "type", "data")

    def __init__(self, opt, rtype, data):
        self.opt, self.type, self.data = opt, rtype, data

    @property
    def is_error(self):
        return bool(self.type & (1 << 31))

    def __repr__(self):
        return (f"OptReply(opt={self.opt}, type={REP_NAMES.get(self.type, hex(self.type))}, "
                f"data={self.data[:64]!r})")


class Info:
    """What NBD_OPT_INFO/GO (or EXPORT_NAME) said about an export."""

    def __init__(self):
        self.size = None
        self.flags = None
        self.name = None
        self.description = None
        self.block_size = None          # (minimum, preferred, maximum)
        self.replies = []               # every OptReply, the final one last

    def __repr__(self):
        return (f"Info(size={self.size}, flags={self.flags and hex(self.flags)}, "
                f"name={self.name!r}, block_size={self.block_size})")


class OptionError(Exception):
    """An option ended with an NBD_REP_ERR_* reply (``.reply``)."""

    def __init__(self, reply):
        super().__init__(f"option {reply.opt}: {REP_NAMES.get(reply.type, hex(reply.type))} "
                         f"{reply.data!r}")
        self.reply = reply
        self.type = reply.type


class Reply:
    """One complete reply of the transmission phase.

    ``kind``: "simple" or "structured"; ``error``: 0 or the first error seen
    (simple error field or the first error chunk); ``message``: the error
    chunk's message; ``data``: for a successful READ, the bytes read (holes
    as zeros); ``chunks``: the structured chunks as (flags, type, payload);
    ``extents``: {context_id: [(length, flags), ...]} for BLOCK_STATUS;
    ``holes``/``data_chunks``: [(offset, length)] of the content chunks."""

    def __init__(self, cookie, request):
        self.cookie = cookie
        self.request = request          # (type, flags, offset, length)
        self.kind = None
        self.error = 0
        self.message = None
        self.data = None
        self.chunks = []
        self.extents = {}
        self.holes = []
        self.data_chunks = []

    def __repr__(self):
        return (f"Reply(cookie={self.cookie:#x}, kind={self.kind}, error={self.error}, "
                f"message={self.message!r}, chunks={[(f, t, len(p)) for f, t, p in self.chunks]})")


class Conn:
    """One connection to an NBD server."""

    def __init__(self, sock, timeout=10.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.handshake_flags = None
        self.client_flags = None
        self.structured = False         # NBD_OPT_STRUCTURED_REPLY acknowledged
        self.meta_contexts = {}         # context id -> name, from the last SET
        self.export = None              # Info of the export in transmission
        self.pending = {}               # cookie -> Reply being assembled
        self._next_cookie = 1

    # -- connecting -------------------------------------------------------

    @classmethod
    def connect(cls, address, timeout=10.0):
        """``address``: a unix socket path (str) or a (host, port) tuple."""
        if isinstance(address, (tuple, list)):
            s = socket.create_connection(tuple(address), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(address)
        return cls(s, timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw bytes --------------------------------------------------------

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(f"send: {e}") from None

    def recv_exact(self, n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except ConnectionResetError as e:
                raise Closed(f"reset after {got} of {n} bytes: {e}") from None
            if k == 0:
                raise Closed(f"EOF after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def read_until_closed(self, timeout=10.0):
        """Everything the server sends until it closes the connection;
        ProtocolViolation if it has not closed within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        out = bytearray()
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolViolation(
                        f"the server did not close the connection in {timeout} s "
                        f"(received {len(out)} bytes: {bytes(out[:64])!r})")
                self.sock.settimeout(left)
                try:
                    b = self.sock.recv(65536)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    return bytes(out)
                if not b:
                    return bytes(out)
                out += b
        finally:
            self.sock.settimeout(old)

    def expect_closed(self, timeout=10.0):
        """The server closes without sending anything more."""
        rest = self.read_until_closed(timeout)
        _check(rest == b"", f"the server sent {len(rest)} bytes before closing: {rest[:64]!r}")

    # -- handshake --------------------------------------------------------

    def read_greeting(self):
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv_exact(18))
        _check(magic == NBDMAGIC, f"greeting magic {magic:#x} != NBDMAGIC")
        _check(opt_magic == IHAVEOPT,
               f"greeting second magic {opt_magic:#x} != IHAVEOPT (oldstyle is {CLISERV_MAGIC:#x})")
        _check(hflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) == 0,
               f"handshake flags {hflags:#x} have bits the spec does not define")
        self.handshake_flags = hflags
        return hflags

    def send_client_flags(self, flags):
        self.client_flags = flags
        self.send(struct.pack(">I", flags))

    def greet(self, client_flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        hflags = self.read_greeting()
        self.send_client_flags(client_flags)
        return hflags

    def send_option(self, opt, data=b"", length=None, magic=IHAVEOPT):
        """An option header and data, raw; ``length`` overrides the length
        field (the data sent is still ``data``)."""
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + bytes(data))

    def read_option_reply(self, opt):
        magic, ropt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        _check(magic == OPT_REPLY_MAGIC, f"option reply magic {magic:#x} != {OPT_REPLY_MAGIC:#x}")
        _check(ropt == opt, f"option reply for option {ropt}, the client sent {opt}")
        _check(length <= 64 << 20, f"option reply length {length} is absurd")
        data = self.recv_exact(length) if length else b""
        r = OptReply(ropt, rtype, data)
        if r.is_error:
            _check(rtype in REP_NAMES, f"unknown error reply type {rtype:#x}")
            if data:
                _check(len(data) <= MAX_STRING, f"error message of {len(data)} bytes")
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolViolation(f"error message is not UTF-8: {data!r}") from None
        return r

    def option_replies(self, opt, data=b"", length=None, intermediate=()):
        """Send an option and read its replies up to the final one (ACK or an
        error); every other reply type must be in ``intermediate``."""
        self.send_option(opt, data, length)
        replies = []
        while True:
            r = self.read_option_reply(opt)
            replies.append(r)
            if r.type == REP_ACK:
                _check(r.data == b"", f"NBD_REP_ACK with {len(r.data)} bytes of data")
                return replies
            if r.is_error:
                return replies
            _check(r.type in intermediate,
                   f"option {opt}: reply type {REP_NAMES.get(r.type, r.type)} is not allowed here")

    def option_final(self, opt, data=b"", length=None):
        """An option whose only reply is final (ACK or an error)."""
        replies = self.option_replies(opt, data, length)
        _check(len(replies) == 1, f"option {opt}: {len(replies)} replies, expected 1")
        return replies[0]

    # -- options ----------------------------------------------------------

    def list_exports(self):
        replies = self.option_replies(OPT_LIST, intermediate=(REP_SERVER,))
        if replies[-1].is_error:
            raise OptionError(replies[-1])
        names = []
        for r in replies[:-1]:
            _check(len(r.data) >= 4, f"NBD_REP_SERVER of {len(r.data)} bytes")
            (n,) = struct.unpack(">I", r.data[:4])
            _check(n <= len(r.data) - 4, f"NBD_REP_SERVER name length {n} > {len(r.data) - 4}")
            names.append(r.data[4:4 + n].decode("utf-8"))
        return names

    @staticmethod
    def info_data(name, requests=(), name_length=None, count=None):
        name = name.encode() if isinstance(name, str) else bytes(name)
        nl = len(name) if name_length is None else name_length
        cnt = len(requests) if count is None else count
        return (struct.pack(">I", nl) + name + struct.pack(">H", cnt)
                + b"".join(struct.pack(">H", q) for q in requests))

    def info_replies(self, opt, data, length=None):
        """NBD_OPT_INFO/GO with raw data: (Info, final OptReply)."""
        replies = self.option_replies(opt, data, length, intermediate=(REP_INFO,))
        info = Info()
        info.replies = replies
        seen = set()
        for r in replies[:-1]:
            _check(len(r.data) >= 2, f"NBD_REP_INFO of {len(r.data)} bytes")
            (itype,) = struct.unpack(">H", r.data[:2])
            _check(itype not in seen, f"NBD_REP_INFO type {itype} sent twice")
            seen.add(itype)
            body = r.data[2:]
            if itype == INFO_EXPORT:
                _check(len(r.data) == 12, f"NBD_INFO_EXPORT length {len(r.data)} != 12")
                info.size, info.flags = struct.unpack(">QH", body)
            elif itype == INFO_NAME:
                info.name = body.decode("utf-8")
            elif itype == INFO_DESCRIPTION:
                info.description = body.decode("utf-8")
            elif itype == INFO_BLOCK_SIZE:
                _check(len(r.data) == 14, f"NBD_INFO_BLOCK_SIZE length {len(r.data)} != 14")
                mn, pref, mx = struct.unpack(">III", body)
                _check(mn & (mn - 1) == 0 and 1 <= mn <= 65536, f"minimum block size {mn}")
                _check(pref & (pref - 1) == 0 and pref >= max(mn, 512),
                       f"preferred block size {pref}")
                _check(mx >= pref, f"maximum payload {mx} < preferred {pref}")
                info.block_size = (mn, pref, mx)
        final = replies[-1]
        if final.type == REP_ACK:
            _check(INFO_EXPORT in seen, "NBD_REP_ACK without NBD_INFO_EXPORT")
        elif final.type == REP_ERR_UNKNOWN:
            _check(not seen, "NBD_REP_INFO sent before NBD_REP_ERR_UNKNOWN")
        return info, final

    def info(self, name, requests=()):
        info, final = self.info_replies(OPT_INFO, self.info_data(name, requests))
        if final.is_error:
            raise OptionError(final)
        return info

    def go(self, name, requests=()):
        info, final = self.info_replies(OPT_GO, self.info_data(name, requests))
        if final.is_error:
            raise OptionError(final)
        self._enter_transmission(info)
        return info

    def export_name(self, name):
        """NBD_OPT_EXPORT_NAME: reads size, flags and (unless NO_ZEROES was
        negotiated) the 124 zero bytes, asserting they are zero."""
        name = name.encode() if isinstance(name, str) else bytes(name)
        self.send_option(OPT_EXPORT_NAME, name)
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        if not (self.client_flags or 0) & FLAG_C_NO_ZEROES:
            z = self.recv_exact(124)
            _check(z == bytes(124), f"the 124 reserved bytes are not zero: {z!r}")
        info = Info()
        info.size, info.flags = size, flags
        self._enter_transmission(info)
        return info

    def _enter_transmission(self, info):
        flags = info.flags
        _check(flags & FLAG_HAS_FLAGS, f"transmission flags {flags:#x} without HAS_FLAGS")
        if not self.structured:
            _check(not flags & FLAG_SEND_DF, f"SEND_DF set ({flags:#x}) without structured replies")
        if not flags & FLAG_SEND_WRITE_ZEROES:
            _check(not flags & FLAG_SEND_FAST_ZERO, "SEND_FAST_ZERO without SEND_WRITE_ZEROES")
        self.export = info

    def abort(self):
        """NBD_OPT_ABORT: the ACK (or nothing), then the server closes."""
        self.send_option(OPT_ABORT)
        try:
            r = self.read_option_reply(OPT_ABORT)
        except Closed:
            return None
        _check(r.type == REP_ACK and r.data == b"", f"NBD_OPT_ABORT answered {r}")
        self.expect_closed()
        return r

    def structured_reply(self):
        r = self.option_final(OPT_STRUCTURED_REPLY)
        if r.type == REP_ACK:
            self.structured = True
        return r

    @staticmethod
    def meta_data(name, queries, name_length=None, count=None):
        name = name.encode() if isinstance(name, str) else bytes(name)
        nl = len(name) if name_length is None else name_length
        cnt = len(queries) if count is None else count
        out = struct.pack(">I", nl) + name + struct.pack(">I", cnt)
        for q in queries:
            q = q.encode() if isinstance(q, str) else bytes(q)
            out += struct.pack(">I", len(q)) + q
        return out

    def meta_replies(self, opt, data, length=None):
        """LIST/SET_META_CONTEXT with raw data: ({name: id}, final OptReply)."""
        replies = self.option_replies(opt, data, length, intermediate=(REP_META_CONTEXT,))
        found = {}
        for r in replies[:-1]:
            _check(len(r.data) > 4, f"NBD_REP_META_CONTEXT of {len(r.data)} bytes")
            (cid,) = struct.unpack(">I", r.data[:4])
            name = r.data[4:].decode("utf-8")
            _check(":" in name, f"context name {name!r} without a namespace")
            _check(name not in found, f"context {name!r} returned twice")
            found[name] = cid
        if opt == OPT_SET_META_CONTEXT:
            ids = list(found.values())
            _check(len(set(ids)) == len(ids), f"context ids not unique: {found}")
            self.meta_contexts = {} if replies[-1].is_error else {v: k for k, v in found.items()}
        return found, replies[-1]

    def set_meta_context(self, name, queries):
        found, final = self.meta_replies(OPT_SET_META_CONTEXT, self.meta_data(name, queries))
        if final.is_error:
            raise OptionError(final)
        return found

    def list_meta_context(self, name, queries):
        found, final = self.meta_replies(OPT_LIST_META_CONTEXT, self.meta_data(name, queries))
        if final.is_error:
            raise OptionError(final)
        return found

    def handshake(self, name="", structured=True, meta=False, requests=(INFO_BLOCK_SIZE,)):
        """greet, optionally STRUCTURED_REPLY and SET_META_CONTEXT
        base:allocation, then GO: the Info."""
        self.greet()
        if structured:
            r = self.structured_reply()
            _check(r.type == REP_ACK, f"NBD_OPT_STRUCTURED_REPLY answered {r}")
        if meta:
            found = self.set_meta_context(name, ["base:allocation"])
            _check("base:allocation" in found, f"base:allocation not selected: {found}")
        return self.go(name, requests)

    # -- transmission -----------------------------------------------------

    def new_cookie(self):
        c = self._next_cookie
        self._next_cookie += 1
        return c

    def send_request(self, cmd, offset=0, length=0, flags=0, cookie=None, payload=None,
                     magic=REQUEST_MAGIC):
        """A request header (and ``payload``, if given: a WRITE's data);
        the cookie.  Fields are packed as given (wrapping to their widths)."""
        if cookie is None:
            cookie = self.new_cookie()
        hdr = struct.pack(">IHHQQI", magic & 0xFFFFFFFF, flags & 0xFFFF, cmd & 0xFFFF,
                          cookie & (2**64 - 1), offset & (2**64 - 1), length & 0xFFFFFFFF)
        if cmd != CMD_DISC:
            _check(cookie not in self.pending, f"cookie {cookie:#x} is already in flight")
            self.pending[cookie] = Reply(cookie, (cmd, flags, offset, length))
        if payload is not None:
            self.send(hdr + bytes(payload))
        else:
            self.send(hdr)
        return cookie

    def _read_message(self):
        """Read one simple reply or one structured chunk; return the Reply
        it completes, or None."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            r = self.pending.get(cookie)
            _check(r is not None, f"simple reply for cookie {cookie:#x}, not in flight "
                                  f"(in flight: {sorted(self.pending)[:16]})")
            _check(not r.chunks, f"simple reply for cookie {cookie:#x} after structured chunks")
            cmd, flags, offset, length = r.request
            _check(not (self.structured and cmd == CMD_READ),
                   "simple reply to NBD_CMD_READ with structured replies negotiated")
            _check(not (cmd == CMD_BLOCK_STATUS and error == 0),
                   "successful NBD_CMD_BLOCK_STATUS answered with a simple reply")
            r.kind = "simple"
            r.error = error
            if cmd == CMD_READ and error == 0:
                r.data = self.recv_exact(length)
            del self.pending[cookie]
            return r
        _check(magic == STRUCTURED_REPLY_MAGIC, f"reply magic {magic:#x}")
        _check(self.structured, "structured reply chunk without NBD_OPT_STRUCTURED_REPLY")
        rflags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        r = self.pending.get(cookie)
        _check(r is not None, f"structured chunk for cookie {cookie:#x}, not in flight")
        _check(length <= (64 << 20) + 64, f"chunk length {length} is absurd")
        payload = self.recv_exact(length) if length else b""
        r.kind = "structured"
        r.chunks.append((rflags, rtype, payload))
        self._check_chunk(r, rflags, rtype, payload)
        if rflags & REPLY_FLAG_DONE:
            del self.pending[cookie]
            self._finish(r)
            return r
        return None

    def _check_chunk(self, r, rflags, rtype, payload):
        cmd, flags, offset, length = r.request
        n = len(payload)

        def content(off, size, what):
            _check(size >= 1, f"{what} chunk of 0 bytes")
            _check(offset <= off and off + size <= offset + length,
                   f"{what} chunk [{off}, {off + size}) outside the request "
                   f"[{offset}, {offset + length})")
            for o, s in r.data_chunks + r.holes:
                _check(off + size <= o or o + s <= off,
                       f"{what} chunk [{off}, {off + size}) overlaps [{o}, {o + s})")
            if flags & CMD_FLAG_DF:
                _check(not r.data_chunks and not r.holes,
                       "more than one content chunk with NBD_CMD_FLAG_DF")

        if rtype == REPLY_TYPE_NONE:
            _check(n == 0, f"NBD_REPLY_TYPE_NONE with length {n}")
            _check(rflags & REPLY_FLAG_DONE, "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
        elif rtype == REPLY_TYPE_OFFSET_DATA:
            _check(cmd == CMD_READ, f"OFFSET_DATA chunk in reply to command {cmd}")
            _check(n >= 9, f"OFFSET_DATA length {n} < 9")
            (off,) = struct.unpack(">Q", payload[:8])
            content(off, n - 8, "OFFSET_DATA")
            r.data_chunks.append((off, n - 8))
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            _check(cmd == CMD_READ, f"OFFSET_HOLE chunk in reply to command {cmd}")
            _check(n == 12, f"OFFSET_HOLE length {n} != 12")
            off, size = struct.unpack(">QI", payload)
            content(off, size, "OFFSET_HOLE")
            _check(not flags & CMD_FLAG_DF, "OFFSET_HOLE chunk with NBD_CMD_FLAG_DF")
            r.holes.append((off, size))
        elif rtype == REPLY_TYPE_BLOCK_STATUS:
            _check(cmd == CMD_BLOCK_STATUS, f"BLOCK_STATUS chunk in reply to command {cmd}")
            _check(n >= 12 and (n - 4) % 8 == 0, f"BLOCK_STATUS length {n}")
            (cid,) = struct.unpack(">I", payload[:4])
            _check(cid in self.meta_contexts, f"BLOCK_STATUS for context id {cid}, "
                                              f"negotiated: {self.meta_contexts}")
            _check(cid not in r.extents, f"two BLOCK_STATUS chunks for context {cid}")
            ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, n, 8)]
            for el, _ in ext:
                _check(el > 0, f"BLOCK_STATUS extent of length 0: {ext[:8]}")
            if flags & CMD_FLAG_REQ_ONE:
                _check(len(ext) == 1, f"{len(ext)} extents with NBD_CMD_FLAG_REQ_ONE")
                _check(ext[0][0] <= length, f"REQ_ONE extent {ext[0][0]} > request {length}")
            else:
                _check(sum(e for e, _ in ext[:-1]) < length,
                       f"BLOCK_STATUS extents past the request: {ext[:8]}...")
            r.extents[cid] = ext
        elif rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET) or rtype & (1 << 15):
            _check(n >= 6, f"error chunk length {n} < 6")
            err, mlen = struct.unpack(">IH", payload[:6])
            _check(err != 0, "error chunk with error 0")
            extra = 8 if rtype == REPLY_TYPE_ERROR_OFFSET else 0
            _check(mlen <= n - 6 - extra, f"error message length {mlen} > {n - 6 - extra}")
            _check(mlen <= MAX_STRING, f"error message of {mlen} bytes")
            msg = payload[6:6 + mlen].decode("utf-8")
            if rtype == REPLY_TYPE_ERROR_OFFSET:
                _check(n == 6 + mlen + 8, f"ERROR_OFFSET length {n} != {6 + mlen + 8}")
                (eoff,) = struct.unpack(">Q", payload[6 + mlen:])
                _check(offset <= eoff < offset + length,
                       f"ERROR_OFFSET offset {eoff} outside the request")
            elif rtype == REPLY_TYPE_ERROR:
                _check(n == 6 + mlen, f"ERROR length {n} != 6 + {mlen}")
            if not r.error:
                r.error, r.message = err, msg
        else:
            raise ProtocolViolation(f"unknown structured reply type {rtype}")

    def _finish(self, r):
        cmd, flags, offset, length = r.request
        if r.error:
            return
        if cmd == CMD_READ:
            covered = sorted(r.data_chunks + r.holes)
            pos = offset
            for o, s in covered:
                _check(o == pos, f"READ [{offset}, {offset + length}) not covered at {pos}: "
                                 f"{covered[:8]}")
                pos = o + s
            _check(pos == offset + length,
                   f"READ [{offset}, {offset + length}) covered only to {pos}")
            buf = bytearray(length)
            for fl, t, p in r.chunks:
                if t == REPLY_TYPE_OFFSET_DATA:
                    (o,) = struct.unpack(">Q", p[:8])
                    buf[o - offset:o - offset + len(p) - 8] = p[8:]
            r.data = bytes(buf)
        elif cmd == CMD_BLOCK_STATUS:
            _check(set(r.extents) == set(self.meta_contexts),
                   f"BLOCK_STATUS for contexts {sorted(r.extents)}, negotiated "
                   f"{sorted(self.meta_contexts)}")
        else:
            _check(all(t == REPLY_TYPE_NONE for _, t, _ in r.chunks),
                   f"command {cmd}: unexpected chunks {[t for _, t, _ in r.chunks]}")

    def read_reply(self):
        """The next complete reply (any cookie)."""
        while True:
            r = self._read_message()
            if r is not None:
                return r

    def read_replies(self, n):
        return [self.read_reply() for _ in range(n)]

    def command(self, cmd, offset=0, length=0, flags=0, payload=None):
        """Send one request and read its reply (nothing else in flight)."""
        _check(not self.pending, f"requests in flight: {sorted(self.pending)}")
        cookie = self.send_request(cmd, offset, length, flags, payload=payload)
        r = self.read_reply()
        _check(r.cookie == cookie, f"reply for cookie {r.cookie:#x}, sent {cookie:#x}")
        return r

    def read(self, offset, length, flags=0):
        return self.command(CMD_READ, offset, length, flags)

    def write(self, offset, data, flags=0):
        return self.command(CMD_WRITE, offset, len(data), flags, payload=data)

    def flush(self):
        return self.command(CMD_FLUSH)

    def trim(self, offset, length, flags=0):
        return self.command(CMD_TRIM, offset, length, flags)

    def write_zeroes(self, offset, length, flags=0):
        return self.command(CMD_WRITE_ZEROES, offset, length, flags)

    def cache(self, offset, length, flags=0):
        return self.command(CMD_CACHE, offset, length, flags)

    def block_status(self, offset, length, flags=0):
        return self.command(CMD_BLOCK_STATUS, offset, length, flags)

    def disc(self):
        """NBD_CMD_DISC; then the server closes (nothing after the replies
        still in flight)."""
        self.send_request(CMD_DISC)


def checked_ok(r):
    """Assert a reply succeeded; return it."""
    if r.error:
        raise AssertionError(f"request {r.request} failed: error {r.error} "
                             f"({errno.errorcode.get(r.error, '?')}) {r.message!r}")
    return r
