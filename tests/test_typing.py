"""The package's types hold (issue 13): ``mypy --strict`` accepts a typed
program that uses the whole public API (tests/typing/example_ok.py) and
reports every deliberate error of tests/typing/example_errors.py, each with
its error code; the package itself checks clean with mypy's defaults."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPING = os.path.join(ROOT, "tests", "typing")


def mypy(tmp_path, *args):
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"),
           "--no-error-summary", "--show-error-codes", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stdout + r.stderr     # 2: mypy itself failed
    return r


def errors_by_line(output, path):
    """{line: {codes}} of the errors mypy reported in ``path``."""
    found = {}
    rel = os.path.relpath(path, ROOT)
    for m in re.finditer(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", output, re.M):
        if os.path.normpath(m.group(1)) == os.path.normpath(rel):
            found.setdefault(int(m.group(2)), set()).add(m.group(3))
    return found


def test_strict_examples(tmp_path):
    ok = os.path.join(TYPING, "example_ok.py")
    bad = os.path.join(TYPING, "example_errors.py")
    # --follow-imports=silent: the package is analysed (its types are
    # what is checked) but --strict's rules are applied to the examples.
    r = mypy(tmp_path, "--strict", "--follow-imports=silent", ok, bad)
    assert errors_by_line(r.stdout, ok) == {}, r.stdout
    expected = {}
    with open(bad) as f:
        for n, line in enumerate(f, 1):
            m = re.search(r"# E: ([a-z-]+)\s*$", line)
            if m:
                expected[n] = {m.group(1)}
    assert len(expected) >= 10
    got = errors_by_line(r.stdout, bad)
    missing = {n: c for n, c in expected.items() if not c <= got.get(n, set())}
    extra = {n: c for n, c in got.items() if n not in expected}
    assert not missing, f"mypy did not report the deliberate errors on lines {missing}:\n{r.stdout}"
    assert not extra, f"errors on lines not marked '# E:': {extra}:\n{r.stdout}"


def test_package_checks_clean(tmp_path):
    r = mypy(tmp_path, "-p", "cxlflash")
    assert r.returncode == 0, r.stdout + r.stderr


def test_typed_example_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(TYPING, "example_ok.py")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
