#!/usr/bin/env python3
"""Check the supported version ranges of pyproject.toml at both ends.

For each end, a fresh virtual environment: ``low`` first installs the oldest
releases this project supports of the libraries whose numerics and behaviour the
tests depend on (torch, Triton, numpy), ``high`` lets pip pick everything (what a
new user gets today); then both run the README's test command
(``pip install -e ".[test]" && pytest -q``) from this checkout. Not part of the
default CI run (two installs and two full suites: about 30 minutes on 2 cores);
run it before changing a range, and commit the JSON it writes.

    python .ci/version_range.py [low] [high]     # default: both
    VERSION_RANGE_DIR=/tmp/vr python .ci/version_range.py   # keep the venvs and logs

Writes benchmarks/results/version-range.json: per end, the versions installed,
the pytest summary line, exit code and seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the oldest supported releases (keep in step with pyproject.toml's lower bounds)
LOW = ["torch==2.13.0", "triton==3.6.0", "numpy==1.26.4"]
ENDS = {"low": LOW, "high": []}
REPORTED = ["torch", "triton", "numpy", "flwr", "ray", "flwr-datasets", "datasets",
            "scikit-learn", "torch-pruning", "protobuf", "grpcio"]
OUT = ROOT / "benchmarks" / "results" / "version-range.json"


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode


def check(end: str, work: Path) -> dict:
    venv = work / end
    log = work / f"{end}.log"
    log.write_text("")
    py = str(venv / "bin" / "python")
    t0 = time.perf_counter()
    result: dict = {"end": end, "pins": ENDS[end], "date": time.strftime("%Y-%m-%d")}
    # the pins and the project in one command, so that the resolver keeps the pins
    # (installed first, a later dependency could upgrade them: pandas 3 needs numpy 2)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [py, "-m", "pip", "install", "-q", "-e", ".[test]", *ENDS[end]]]
    for step in steps:
        if _run(step, log) != 0:
            result.update(install_failed=" ".join(step[3:]), log=str(log))
            return result
    result["install_seconds"] = round(time.perf_counter() - t0, 1)
    code = ("import importlib.metadata as m, json\n"
            f"print(json.dumps({{p: m.version(p) for p in {REPORTED!r}}}))")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True)
    result["versions"] = json.loads(out.stdout)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    t1 = time.perf_counter()
    rc = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], log, env)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    result.update(pytest_exit_code=rc, pytest_summary=lines[-1] if lines else "",
                  pytest_seconds=round(time.perf_counter() - t1, 1), log=str(log))
    return result


def main(argv: list[str]) -> int:
    ends = argv or list(ENDS)
    unknown = [e for e in ends if e not in ENDS]
    if unknown:
        print(f"version_range: unknown end {unknown[0]!r}; allowed: {', '.join(ENDS)}",
              file=sys.stderr)
        return 2
    work = Path(os.environ.get("VERSION_RANGE_DIR") or tempfile.mkdtemp(prefix="bonsai-vr-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for end in ends:
        print(f"{end}: installing into {work / end} (log {work / (end + '.log')})", flush=True)
        r = check(end, work)
        print(f"{end}: {r.get('versions', {}).get('torch', '?')} / triton "
              f"{r.get('versions', {}).get('triton', '?')}: "
              f"{r.get('pytest_summary') or 'install failed: ' + r.get('install_failed', '')}",
              flush=True)
        results.append(r)
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    runs = {r["end"]: r for r in previous.get("ends", [])}
    runs.update({r["end"]: r for r in results})
    OUT.write_text(json.dumps({"python": sys.version.split()[0],
                               "ends": [runs[e] for e in ENDS if e in runs]}, indent=2) + "\n")
    print(f"wrote {OUT}")
    failed = [r for r in results if r.get("pytest_exit_code") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
