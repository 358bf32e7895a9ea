"""fio's figure next to an ``io`` row: the same requests on the same store."""
import json
import os
import time

from ..backing import is_rbd, parse_rbd
from .iorun import region_blocks
from .units import si


def fio_command(path, opts, region_bytes, block_size):
    """fio doing what an ``io`` row does, on the same store: the same
    request size, read share, pattern, queue depth and threads, over the
    same region (a vLUN's blocks are the LUN's first bytes), io_uring,
    O_DIRECT when the run uses it; an RBD image through fio's rbd engine."""
    seq = opts.pattern == "seq"
    if opts.read_pct >= 100:
        rw = "read" if seq else "randread"
    elif opts.read_pct <= 0:
        rw = "write" if seq else "randwrite"
    else:
        rw = "rw" if seq else "randrw"
    if is_rbd(path):            # the same image through fio's rbd engine
        rbd = parse_rbd(path)
        where = ["--ioengine=rbd", f"--pool={rbd['pool']}", f"--rbdname={rbd['image']}",
                 f"--clientname={rbd['client_id']}"]
    else:
        where = [f"--filename={path}", "--ioengine=io_uring",
                 f"--direct={1 if opts.direct_io else 0}"]
    cmd = ["fio", "--name=cxlflash-bench"] + where + [
           f"--rw={rw}", f"--bs={opts.blocks * block_size}", f"--iodepth={opts.qd}",
           f"--numjobs={opts.threads}", "--group_reporting", "--thread",
           f"--size={region_bytes}", "--offset=0", f"--runtime={opts.duration:g}",
           "--time_based", "--norandommap", "--randrepeat=0", "--output-format=json"]
    if 0 < opts.read_pct < 100:
        cmd.append(f"--rwmixread={opts.read_pct}")
    if opts.read_pct >= 100:
        cmd.append("--readonly")
    return cmd


def run_fio(target, lun, opts, log):
    """fio's requests per second for the run's store, depth and request
    size, or None (the reason is a note)."""
    import subprocess
    path = (opts.target if opts.target != "memory" and not opts.connect
            else f"/proc/{os.getpid()}/fd/{target.fd}")        # the memfd (or the daemon's store)
    region = region_blocks(lun, opts) * lun.block_size
    cmd = fio_command(path, opts, region, lun.block_size)
    env = None
    if is_rbd(path) and opts.read_pct < 100 and opts.lun == "virtual":
        log.say("fio not run: its writes to the RBD image would be refused (EROFS) while "
                "this run's virtual LUN holds the image's exclusive lock; "
                "benchmarks/rbd_ratios.py compares with fio's rbd engine")
        return None
    if is_rbd(path):
        # fio has no option for the cluster's conf: librados reads
        # CEPH_CONF; its cache off, as ours is (CEPH_ARGS).
        env = dict(os.environ, CEPH_ARGS="--rbd_cache=false")
        conf = parse_rbd(path)["conf"]
        if conf:
            env["CEPH_CONF"] = conf
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                           timeout=opts.duration * 3 + 30)
        doc = json.loads(p.stdout[p.stdout.index("{"):])
        job = doc["jobs"][0]
        if job.get("error"):
            raise ValueError(f"fio error {job['error']}")
        iops = float(job["read"]["iops"]) + float(job["write"]["iops"])
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
        log.say(f"fio could not run ({e}); {' '.join(cmd)}")
        return None
    finally:
        log.spent("fio", time.monotonic() - t0)
    return {"iops": iops, "command": cmd}


def format_fio(rows):
    """A line per row that has fio's figure next to it."""
    out = []
    for r in rows:
        f = getattr(r, "fio", None)
        if f:
            out.append(f"fio, the same requests on the same store ("
                       f"{_flag(f['command'], 'ioengine')}, qd "
                       f"{_flag(f['command'], 'iodepth')}, {_flag(f['command'], 'numjobs')} "
                       f"thread(s)): {si(f['iops']).strip()} req/s; {r.name}: "
                       f"{r.main.rate / f['iops']:.2f}x fio's rate" if f["iops"] else "")
    return "\n".join(l for l in out if l)


def _flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))
