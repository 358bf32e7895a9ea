"""A client of a cxlflash daemon, run as its own program by
``test_daemon_faults.py`` (a real, unrelated process: not a fork of the
test).  It prints one line per event on stdout and flushes it.

    python fault_client.py SOCKET hold CHUNKS [child]
        attach, a virtual LUN of CHUNKS chunks (a pattern at its first
        block), a direct LUN on the second LUN when there is one, and with
        ``child`` a forked child that clones the context; prints
        ``ready CONTEXT_ID CHILD_PID`` and waits to be killed.  The child
        prints ``orphan ok`` once its parent is gone and its clone still
        reads the pattern (``orphan bad ...`` otherwise).

    python fault_client.py SOCKET churn SEED
        prints ``go`` and loops until killed: attach, virtual LUNs created,
        resized, written, read, verified, released, direct LUNs, clones in
        forked children, detach -- so that a kill lands in the middle of a
        request or a transfer.

    python fault_client.py SOCKET stranger JSON
        tries to name, use and do I/O through another process's context
        (JSON: context_id, virtual, direct, wwid, direct_wwid); prints one
        JSON line {what: errno or ["afu", rc] or "ok"}.

    python fault_client.py SOCKET user
        as a non-administrator: attach and I/O, then the administrator's
        operations; prints one JSON line {what: errno or "ok"}.
"""
import errno
import json
import os
import random
import sys
import time

import cxlflash
from cxlflash import uapi

CHUNK_BLOCKS = 65536            # 4K blocks per chunk of the daemon's LUNs


def out(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def pattern(tag, n=4096):
    return (tag.encode() * (n // len(tag) + 1))[:n]


def hold(a, chunks, with_child):
    luns = a.luns()
    ctx = a.open_disk(luns[0]).attach()
    v = ctx.create_virtual(chunks * CHUNK_BLOCKS)
    v.write(0, pattern(f"hold{os.getpid()}"))
    if len(luns) > 1:
        d = a.open_disk(luns[1])
        ctx.attach_disk(d)
        dl = ctx.open_direct(disk=d)
        dl.write(0, pattern("direct"))
    child = 0
    if with_child:
        r, w = os.pipe()
        parent = os.getpid()
        child = os.fork()
        if child == 0:                                     # the clone holder
            os.close(r)
            ctx.clone_after_fork()
            os.write(w, b"c")
            os.close(w)
            while os.getppid() == parent:
                time.sleep(0.005)
            try:
                got = bytes(v.read(0, 1))
                ok = got == pattern(f"hold{parent}")
                out("orphan", "ok") if ok else out("orphan", "bad", got[:16])
            except Exception as e:                         # noqa: BLE001
                out("orphan", "bad", repr(e))
            while True:
                time.sleep(60)
        os.close(w)
        assert os.read(r, 1) == b"c"
        os.close(r)
    out("ready", ctx.context_id, child)
    while True:
        time.sleep(60)


def churn(a, seed):
    rnd = random.Random(seed)
    luns = a.luns()
    out("go")
    children = []
    while True:
        ctx = a.open_disk(luns[0]).attach()
        vs = []
        d = None                                   # the direct LUN, once attached
        for _ in range(rnd.randint(1, 4)):
            op = rnd.random()
            if op < 0.5 or not vs:
                v = ctx.create_virtual(rnd.randint(0, 6) * CHUNK_BLOCKS // 2)
                vs.append(v)
                if v.size:
                    v.write(rnd.randrange(v.size), pattern("churn"))
            elif op < 0.7:
                v = rnd.choice(vs)
                v.set_size(rnd.randint(0, 8) * CHUNK_BLOCKS // 3)
            elif op < 0.8 and len(luns) > 1:
                if d is None:
                    d = a.open_disk(luns[1])
                    ctx.attach_disk(d)
                dl = ctx.open_direct(disk=d)
                dl.write(rnd.randrange(64), pattern("churn"))
                dl.read(0, 8)
                dl.close()
            elif op < 0.9:
                v = vs.pop(rnd.randrange(len(vs)))
                if v.size:
                    v.read(0, 1)
                v.close()
            else:
                pid = os.fork()
                if pid == 0:                               # a cloning child
                    try:
                        ctx.clone_after_fork()
                        for v in vs:
                            if v.size:
                                v.read(0, 1)
                        if rnd.random() < 0.5:
                            time.sleep(rnd.random() * 0.05)
                    finally:
                        os._exit(0)
                children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        children.clear()
        if rnd.random() < 0.7:
            ctx.close()
        # else: the context stays, with its handles, until the kill


def outcome(fn):
    try:
        fn()
        return "ok"
    except cxlflash.AfuError as e:
        return ["afu", e.afu_rc]
    except OSError as e:
        return e.errno


def stranger(a, spec):
    """Every way a process could reach a context that is not its own."""
    cid, hv, hd = spec["context_id"], spec["virtual"], spec["direct"]
    disk = a.open_disk(bytes.fromhex(spec["wwid"]))
    ddisk = a.open_disk(bytes.fromhex(spec["direct_wwid"]))
    hdr = uapi.dk_cxlflash_hdr
    rw = os.O_RDWR
    ioctl = cxlflash.ioctl
    res = {}
    res["attach_reuse"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_ATTACH,
                                                uapi.dk_cxlflash_attach(
        hdr=hdr(flags=rw | uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT), context_id=cid)))
    res["user_virtual"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_USER_VIRTUAL,
                                                uapi.dk_cxlflash_uvirtual(
        hdr=hdr(flags=rw), context_id=cid, lun_size=CHUNK_BLOCKS)))
    res["user_direct"] = outcome(lambda: ioctl(ddisk, uapi.DK_CXLFLASH_USER_DIRECT,
                                               uapi.dk_cxlflash_udirect(
        hdr=hdr(flags=rw), context_id=cid)))
    res["resize"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_VLUN_RESIZE,
                                          uapi.dk_cxlflash_resize(
        hdr=hdr(flags=rw), context_id=cid, rsrc_handle=hv, req_size=0)))
    res["verify"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_VERIFY,
                                          uapi.dk_cxlflash_verify(
        hdr=hdr(flags=rw), context_id=cid, rsrc_handle=hv)))
    res["recover"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_RECOVER_AFU,
                                           uapi.dk_cxlflash_recover_afu(
        hdr=hdr(flags=rw), context_id=cid)))
    res["release"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_RELEASE,
                                           uapi.dk_cxlflash_release(
        hdr=hdr(flags=rw), context_id=cid, rsrc_handle=hv)))
    res["release_direct"] = outcome(lambda: ioctl(ddisk, uapi.DK_CXLFLASH_RELEASE,
                                                  uapi.dk_cxlflash_release(
        hdr=hdr(flags=rw), context_id=cid, rsrc_handle=hd)))
    res["detach"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_DETACH,
                                          uapi.dk_cxlflash_detach(
        hdr=hdr(flags=rw), context_id=cid)))
    # A clone of the stranger's context into one of our own: the source
    # must belong to our parent (it does not).
    mine = a.open_disk(bytes.fromhex(spec["wwid"])).attach()
    res["clone"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_VLUN_CLONE,
                                         uapi.dk_cxlflash_clone(
        hdr=hdr(flags=rw), context_id_src=cid, context_id_dst=mine.context_id)))
    # ... and into its context from ours.
    res["clone_into"] = outcome(lambda: ioctl(disk, uapi.DK_CXLFLASH_VLUN_CLONE,
                                              uapi.dk_cxlflash_clone(
        hdr=hdr(flags=rw), context_id_src=mine.context_id, context_id_dst=cid)))
    res["read"] = outcome(lambda: a.read(cid, hv, 0, 1))
    res["write"] = outcome(lambda: a.write(cid, hv, 0, b"S" * 4096))
    res["read_direct"] = outcome(lambda: a.read(cid, hd, 0, 1))
    res["write_direct"] = outcome(lambda: a.write(cid, hd, 0, b"S" * 4096))
    res["translate"] = outcome(lambda: a.translate(cid, hv, [0]))
    mine.close()
    out(json.dumps(res))


def forge(path, pid):
    """Send a HELLO with another process's credentials (the kernel
    refuses them to anyone but root)."""
    import socket
    import struct
    from cxlflash.server import wire
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        creds = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                  struct.pack("iII", pid, os.getuid(), os.getgid()))]
        s.sendmsg([wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_HELLO, 0, 0)],
                  creds)
    finally:
        s.close()


def user(a, path):
    """A user who is not an administrator."""
    res = {"uid": os.getuid()}
    luns = a.luns()
    ctx = a.open_disk(luns[0]).attach()
    v = ctx.create_virtual(CHUNK_BLOCKS)
    res["io"] = outcome(lambda: (v.write(0, pattern("user")),
                                 None if bytes(v.read(0, 1)) == pattern("user")
                                 else 1 / 0))
    prov = uapi.ht_cxlflash_lun_provision(
        hdr=uapi.ht_cxlflash_hdr(subcmd=uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_QUERY_PORT))
    res["host_ioctl"] = outcome(lambda: cxlflash.ioctl(
        a, uapi.HT_CXLFLASH_LUN_PROVISION, prov))
    res["add_lun"] = outcome(lambda: a.add_lun(None, size=1 << 28))
    res["create_lun"] = outcome(lambda: a.create_lun(1 << 28))
    res["delete_lun"] = outcome(lambda: a.delete_lun(luns[-1]))
    res["reset"] = outcome(a.reset)
    res["begin_reset"] = outcome(a.begin_reset)
    res["end_reset"] = outcome(a.end_reset)
    res["fail"] = outcome(a.fail)
    res["inject_fault"] = outcome(lambda: a.inject_fault("attach"))
    res["signal_waiters"] = outcome(a.signal_waiters)
    res["lun_mode"] = outcome(lambda: setattr(a, "lun_mode", 1))
    res["status"] = outcome(a.status)
    res["io_after"] = outcome(lambda: v.read(0, 1))
    res["forge"] = outcome(lambda: forge(path, int(os.environ["FAULT_FORGE_PID"])))
    ctx.close()
    out(json.dumps(res))


def drop_privileges(uid):
    """Become ``uid`` (after every import: the interpreter may live where
    that user cannot read)."""
    import importlib
    for name in ("cxlflash.server.client", "numpy", "json", "socket", "struct"):
        importlib.import_module(name)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def main(argv):
    path, mode = argv[1], argv[2]
    if os.environ.get("FAULT_CLIENT_UID"):
        drop_privileges(int(os.environ["FAULT_CLIENT_UID"]))
    a = cxlflash.connect(path)
    if mode == "hold":
        hold(a, int(argv[3]), len(argv) > 4 and argv[4] == "child")
    elif mode == "churn":
        churn(a, int(argv[3]))
    elif mode == "stranger":
        stranger(a, json.loads(argv[3]))
    elif mode == "user":
        user(a, path)
    else:
        raise SystemExit(f"unknown mode {mode}")
    a.close()


if __name__ == "__main__":
    try:
        main(sys.argv)
    except BrokenPipeError:
        os._exit(errno.EPIPE)
