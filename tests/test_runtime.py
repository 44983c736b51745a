"""Process-tree teardown (fl.runtime) on real processes, in a child interpreter so
that the subreaper setting never touches the test runner."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ORPHAN = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from fl.proctree import PR_GET_CHILD_SUBREAPER, Orphans, prctl

    def ppid(pid):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])

    orphans = Orphans()
    assert orphans.enabled and prctl(PR_GET_CHILD_SUBREAPER) == 1
    # a child that starts a sleeper in its own session (no marker, no session we
    # know) and exits at once: the sleeper is orphaned
    starter = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(120)'], start_new_session=True, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True)
    sleeper = int(out.stdout)
    assert ppid(sleeper) == os.getpid(), "the orphan is ours, not init's"
    orphans.end()
    assert not Path(f"/proc/{sleeper}").exists(), "killed and reaped"
    assert prctl(PR_GET_CHILD_SUBREAPER) == 0, "subreaper setting restored"
    print("ok")
""")


def test_orphans_are_adopted_killed_and_reaped():
    out = subprocess.run([sys.executable, "-c", ORPHAN], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
