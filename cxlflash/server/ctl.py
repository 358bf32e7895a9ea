"""``cxlflash ctl``: what a daemon serves, for a person or a program.

``cxlflash ctl [--socket PATH] status|luns|contexts [--json]`` connects as
any client does (``cxlflash.connect``), asks ``adapter.status()`` and prints
it: tables for a person, or with ``--json`` the dict (``status``) or its
``luns`` / ``contexts`` list, as JSON.  Exit 1 with one line on stderr when
no daemon answers.
"""
import json
import os
import sys

WHAT = ("status", "luns", "contexts")


def add_parser(sub):
    c = sub.add_parser(
        "ctl", help="show what a cxlflash daemon serves",
        description="Show a cxlflash daemon's LUNs (WWID, size, mode, free and total "
                    "chunks), its contexts (id, pid, LUNs, handles, chunks held) and "
                    "its counters.")
    c.add_argument("--socket", metavar="PATH",
                   help="the daemon's socket (default: $CXLFLASH_SOCKET, else the "
                        "standard location, as cxlflash.connect())")
    c.add_argument("what", nargs="?", choices=WHAT, default="status",
                   help="status (default: everything), luns or contexts")
    c.add_argument("--json", action="store_true",
                   help="print JSON (status: the whole dict; luns, contexts: the list)")
    return c


def _bytes(n):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:g} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def _table(head, rows):
    """Left-aligned columns, two spaces apart; numbers right-aligned."""
    cells = [head] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(head))]
    numeric = [all(isinstance(r[i], int) for r in rows) and bool(rows)
               for i in range(len(head))]
    out = []
    for r in cells:
        out.append("  ".join(c.rjust(w) if num else c.ljust(w)
                             for c, w, num in zip(r, width, numeric)).rstrip())
    return "\n".join(out)


def format_luns(status):
    luns = status.get("luns", [])
    if not luns:
        return "no LUNs"
    rows = [[lun["wwid"], _bytes(lun["size"]), lun["mode"],
             ",".join(str(p) for p in lun.get("ports", [])),
             lun.get("users", 0), lun["chunks_free"], lun["chunks_total"],
             lun.get("path") or "memory"] for lun in luns]
    return _table(["WWID", "SIZE", "MODE", "PORTS", "USERS", "FREE", "CHUNKS", "BACKING"],
                  rows)


def format_contexts(status):
    ctxs = status.get("contexts", [])
    if not ctxs:
        return "no contexts"
    rows = [[f"0x{c['context_id']:016x}", c["pid"], " ".join(c.get("luns", [])) or "-",
             c["handles"], c["chunks"], "yes" if c.get("in_error") else "no"]
            for c in ctxs]
    return _table(["CONTEXT", "PID", "LUNS", "HANDLES", "CHUNKS", "IN_ERROR"], rows)


def format_counters(status):
    counters = status.get("counters", {})
    if not counters:
        return "no counters"
    w = max(len(k) for k in counters)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in counters.items())


def format_status(status):
    head = (f"daemon pid {status.get('pid')}, uid {status.get('uid')}, "
            f"state {status.get('state')}, {status.get('ports')} ports, "
            f"{len(status.get('luns', []))} LUNs, {len(status.get('contexts', []))} contexts")
    return "\n\n".join([head, "LUNs\n" + format_luns(status),
                        "Contexts\n" + format_contexts(status),
                        "Counters\n" + format_counters(status)])


def render(status, what="status", as_json=False):
    """The text ``cxlflash ctl WHAT [--json]`` prints for ``status``."""
    if as_json:
        return json.dumps(status if what == "status" else status.get(what, []), indent=2)
    return {"status": format_status, "luns": format_luns,
            "contexts": format_contexts}[what](status)


def permission_hint(path):
    """Why this user cannot connect to the daemon at ``path`` when the
    socket's permissions refuse it (None when they do not): the socket's
    mode, owner and group, and what to do."""
    import errno
    import grp
    import pwd
    import socket
    import stat
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM):
                return None
        else:
            return None
    try:
        st = os.stat(path)
    except OSError:
        return f"permission denied on {path} (its directory refuses this user)"

    def name(get, i):
        try:
            return get(i)[0]
        except KeyError:
            return str(i)
    user, group = name(pwd.getpwuid, st.st_uid), name(grp.getgrgid, st.st_gid)
    return (f"permission denied on {path} (mode {stat.S_IMODE(st.st_mode):04o}, owner "
            f"{user}, group {group}): a daemon may be running there; to use it, be in "
            f"group {group} (or run as {user})")


def run(args):
    import cxlflash
    path = args.socket if args.socket is not None else cxlflash.default_socket()
    try:
        adapter = cxlflash.connect(path)
    except OSError as e:
        print(f"cxlflash ctl: {permission_hint(path) or e.strerror or e}", file=sys.stderr)
        return 1
    try:
        status = adapter.status()
    except OSError as e:
        print(f"cxlflash ctl: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        adapter.close()
    print(render(status, args.what, args.json))
    return 0
