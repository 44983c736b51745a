"""Teardown under fire: repeated signals hurry it and never abandon it
(fl.interrupts), and a watchdog ends every process tree when ``bonsai`` itself
is SIGKILLed (fl.watchdog.Watchdog).

Processes are identified by PID and start time, so a reused PID is never taken
for a survivor, and Ray's agents (whose environment cannot be read once they set
their process title) are followed from a snapshot of the tree taken before the
kill, not only by the environment marker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from processes import ROOT, bonsai, leftovers, wait_gone

from fl.proctree import MARKER_ENV, alive, descendants, start_time
from fl.results import read_rounds

GONE_WITHIN = 10.0  # seconds: generous for a loaded 2-core machine; real runs take about 1 s


def identities(pids) -> dict[int, int]:
    return {p: st for p in pids if (st := start_time(p)) is not None}


def still_alive(ids: dict[int, int]) -> list[int]:
    """Those of ``ids`` that are still the same, non-zombie processes."""
    return [p for p, st in ids.items() if start_time(p) == st and alive(p)]


def snapshot(pid: int, mark: str) -> dict[int, int]:
    """Every process of ``pid``'s tree (descendants and the sessions they lead) and every
    process carrying the test mark, by identity."""
    return identities(set(descendants(pid)) | set(leftovers(mark)))


@pytest.fixture
def private_tmp():
    """A short TMPDIR of its own (Ray's socket paths must stay under 108 characters):
    the runtime's temporary folders land here, so a leak is visible."""
    d = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def ours(tmp: Path) -> list[str]:
    """The runtimes' private folders left in ``tmp``."""
    return sorted(p.name for p in tmp.iterdir()
                  if p.name.startswith(("bonsai-flwr-", "bray-", "bonsai-deploy-")))


def child(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --- signals (fast, no Flower) --------------------------------------------------------------
SECOND_SIGNAL = """
    import json, os, signal, sys, threading, time
    from pathlib import Path
    from fl import interrupts
    from fl.procgroup import ProcessGroup
    from fl.proctree import MARKER_ENV, alive

    marker, folder = sys.argv[1:3]
    interrupts.install()
    procs = ProcessGroup({**os.environ, MARKER_ENV: marker}, marker, remove=[folder])
    log = Path(folder) / "stubborn.log"
    stubborn = procs.start("stubborn", [sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"], log)
    while "ready" not in log.read_text():
        time.sleep(0.05)
    t0 = time.monotonic()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C
        time.sleep(10)
        raise SystemExit("no KeyboardInterrupt")
    except KeyboardInterrupt:
        # the second Ctrl-C lands 0.5 s into a teardown that would grant 60 s of grace
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        procs.close(grace=60.0)
    print(json.dumps({"seconds": time.monotonic() - t0, "hurried": interrupts.hurried(),
                      "stubborn_alive": alive(stubborn.pid),
                      "folder": os.path.exists(folder)}))
"""


def test_second_signal_hurries_the_teardown_and_never_abandons_it(tmp_path):
    folder = tmp_path / "private"
    folder.mkdir()
    proc = child(SECOND_SIGNAL, uuid.uuid4().hex, str(folder))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["hurried"] and not res["stubborn_alive"] and not res["folder"]
    assert 0.5 <= res["seconds"] < 10, res  # SIGKILL at the second signal, not after 60 s


SIGNAL_IN_TEARDOWN = """
    import os, signal, time
    from fl import interrupts

    interrupts.install()
    try:
        with interrupts.teardown():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler ran here and raised nothing
            print("teardown finished, hurried:", interrupts.hurried())
    except KeyboardInterrupt:
        print("then interrupted")
    os.kill(os.getpid(), signal.SIGINT)  # after the interrupt: only hurries
    time.sleep(0.3)
    print("still here")
"""


def test_a_signal_during_a_teardown_is_raised_after_it():
    proc = child(SIGNAL_IN_TEARDOWN)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines() == ["teardown finished, hurried: True", "then interrupted",
                                "still here"]


# --- the watchdog (fast, no Flower) ---------------------------------------------------------
SPAWNER = """
    import os, subprocess, sys, time
    from fl.proctree import MARKER_ENV

    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    if sys.argv[1] == "tree":  # a child in our session, a grandchild in a new one
        subprocess.Popen(sleep)
        subprocess.Popen(sleep, start_new_session=True)
        time.sleep(600)
    else:  # like Ray's agents: no marker, own session, orphaned when we exit
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        subprocess.Popen(sleep, start_new_session=True, env=env)
        time.sleep(3.0)  # the watcher records every 0.5 s (and may start slowly when loaded)
"""

PARENT = """
    import json, os, sys, time
    from pathlib import Path
    from fl.procgroup import ProcessGroup
    from fl.proctree import MARKER_ENV, descendants

    marker, folder, log, spawner = sys.argv[1:5]
    procs = ProcessGroup({**os.environ, MARKER_ENV: marker}, marker, remove=[folder], log=log)
    procs.start("tree", [sys.executable, "-c", spawner, "tree"], Path(folder) / "tree.log")
    procs.start("orphan", [sys.executable, "-c", spawner, "orphan"], Path(folder) / "o.log")
    time.sleep(4.5)  # the orphan's parent exited: it is ours now (subreaper), unmarked
    watcher = procs.watchdog.proc.pid
    print(json.dumps({"watcher": watcher,
                      "tree": [p for p in descendants(os.getpid()) if p != watcher]}),
          flush=True)
    time.sleep(600)
"""


def test_watchdog_ends_every_tree_when_its_parent_is_killed(tmp_path):
    folder, log = tmp_path / "private", tmp_path / "watchdog.log"
    folder.mkdir()
    marker = uuid.uuid4().hex
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 env={**os.environ, MARKER_ENV: "someone-else"})
    parent = child(PARENT, marker, str(folder), str(log), textwrap.dedent(SPAWNER))
    try:
        line = parent.stdout.readline()
        assert line, parent.communicate(timeout=10)[1][-3000:]
        started = json.loads(line)
        ids = identities([*started["tree"], started["watcher"]])
        # "tree" and its 2 sleepers, the exited "orphan" root (a zombie), its orphan, the watcher
        assert len(ids) == 6
        parent.kill()
        parent.wait(timeout=10)
        t0 = time.monotonic()
        assert not (left := wait_gone(lambda: still_alive(ids), GONE_WITHIN)), left
        print(f"watchdog: {len(ids)} processes gone {time.monotonic() - t0:.1f} s after SIGKILL")
        assert not folder.exists()
        assert "the watchdog killed 4 processes and removed 1 of 1 temporary folders" in \
            log.read_text()
        assert alive(bystander.pid)  # not started by the parent: left alone
    finally:
        for p in (bystander, parent):
            p.kill()
            p.wait(timeout=10)


def test_watchdog_leaves_everything_alone_after_a_normal_close(tmp_path):
    """``close`` ends the trees itself and the watcher exits without acting."""
    code = """
        import os, sys
        from pathlib import Path
        from fl.procgroup import ProcessGroup
        from fl.proctree import MARKER_ENV, alive

        marker, folder, log = sys.argv[1:4]
        procs = ProcessGroup({**os.environ, MARKER_ENV: marker}, marker, remove=[folder], log=log)
        procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
                    Path(folder) / "s.log")
        watcher = procs.watchdog.proc
        procs.close(grace=1.0)
        print(watcher.returncode, os.path.exists(folder), alive(watcher.pid))
    """
    folder, log = tmp_path / "private", tmp_path / "watchdog.log"
    folder.mkdir()
    proc = child(code, uuid.uuid4().hex, str(folder), str(log))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["0", "False", "False"]
    assert not log.exists()  # it did nothing


# --- real runs ------------------------------------------------------------------------------
def start_run(tmp_path: Path, tmp: Path, mark: str) -> tuple[subprocess.Popen, Path]:
    """``bonsai run`` of the quickstart (30 rounds), waited for until its first round
    record is written."""
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", "--set", "rounds=30",
                   "--set", f"output_dir={tmp_path}"], mark, env={"TMPDIR": str(tmp)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = list(tmp_path.iterdir()) if tmp_path.exists() else []
        if dirs and read_rounds(dirs[0]):
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert read_rounds(run_dir) and ours(tmp)  # running, with its private folders
    return proc, run_dir


@pytest.mark.slow
def test_sigkill_of_bonsai_run_leaves_nothing_running(tmp_path, private_tmp):
    mark = uuid.uuid4().hex
    proc, run_dir = start_run(tmp_path / "r", private_tmp, mark)
    ids = snapshot(proc.pid, mark)
    assert len(ids) >= 5  # SuperLink, SuperExec, the simulation, Ray, the watcher ...
    proc.kill()
    proc.wait(timeout=10)
    t0 = time.monotonic()
    assert not (left := wait_gone(mark, GONE_WITHIN)), left
    assert not (left := wait_gone(lambda: still_alive(ids), 2.0)), left
    print(f"bonsai run: {len(ids)} processes gone {time.monotonic() - t0:.1f} s after SIGKILL")
    assert ours(private_tmp) == []
    assert "bonsai (PID" in (run_dir / "watchdog.log").read_text()


@pytest.mark.slow
def test_second_ctrl_c_escalates_and_the_teardown_completes(tmp_path, private_tmp):
    mark = uuid.uuid4().hex
    proc, run_dir = start_run(tmp_path / "r", private_tmp, mark)
    ids = snapshot(proc.pid, mark)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # the teardown is granting Ray its SIGTERM grace now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted; every process was stopped; partial results in {run_dir}" in err
    assert "Traceback" not in err
    assert not (left := wait_gone(mark, 5.0)), left  # gone when bonsai exits
    assert not (left := wait_gone(lambda: still_alive(ids), 2.0)), left
    assert ours(private_tmp) == []
    assert not (run_dir / "watchdog.log").exists()  # the teardown did it all itself


EXPERIMENT = """\
name: deploy-kill
rounds: 50
model: mlp
dataset:
  name: digits
partition:
  kind: iid
  num_clients: 2
strategy:
  name: fedavg
  min_train_clients: 2
"""


@pytest.mark.slow
def test_sigkill_of_bonsai_deploy_local_leaves_nothing_running(tmp_path, private_tmp):
    from fl.config import load
    from fl.deploy.split import write_split

    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENT)
    write_split(load(exp), tmp_path / "data")
    mark = uuid.uuid4().hex
    proc = bonsai(["deploy", "local", str(exp), "--nodes", "2", "--data", str(tmp_path / "data"),
                   "--quiet", "--threads", "1", "--device", "cpu",
                   "--set", f"output_dir={tmp_path}/r"], mark, env={"TMPDIR": str(private_tmp)})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list((tmp_path / "r").glob("*/nodes/node-1.log"))
        if logs and "SuperNode ID" in logs[0].read_text():
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    ids = snapshot(proc.pid, mark)
    assert len(ids) >= 5 and ours(private_tmp)  # SuperLink, 2 SuperNodes, flwr run, watcher
    proc.kill()
    proc.wait(timeout=10)
    t0 = time.monotonic()
    assert not (left := wait_gone(mark, GONE_WITHIN)), left
    assert not (left := wait_gone(lambda: still_alive(ids), 2.0)), left
    print(f"deploy local: {len(ids)} processes gone {time.monotonic() - t0:.1f} s after SIGKILL")
    assert ours(private_tmp) == []
    (run_dir,) = (tmp_path / "r").iterdir()
    assert "bonsai (PID" in (run_dir / "watchdog.log").read_text()
