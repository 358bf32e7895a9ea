"""Running test code in a real forked child."""
import os
import pickle


def in_child(fn):
    """Run ``fn`` in a forked child; return what it returned (through a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover (child)
        try:
            os.close(r)
            try:
                res = ("ok", fn())
            except BaseException as e:             # noqa: BLE001
                res = ("exc", type(e).__name__, getattr(e, "errno", None), str(e))
            try:
                data = pickle.dumps(res)
            except Exception as e:                 # noqa: BLE001
                data = pickle.dumps(("exc", "PickleError", None, repr(e)))
            os.write(w, data)
            os.close(w)
        finally:
            os._exit(0)
    os.close(w)
    parts = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        parts.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    res = pickle.loads(b"".join(parts))
    assert res[0] == "ok", f"the child failed: {res}"
    return res[1]
