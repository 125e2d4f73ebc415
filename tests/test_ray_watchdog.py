"""The Ray watchdog's parts, on real processes of this machine and without Ray (Linux: it reads /proc).

tests/test_ray.py runs the watchdog whole (a SIGKILLed driver, a normal end, ray.shutdown); these pin
each part: which processes it counts as the session's, how it reads /proc, and how it stops them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dino3.integrations import ray_watchdog as watchdog

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def spawn():
    """Start processes that the test ends, whatever happens."""
    started = []

    def start(command=SLEEP, **options):
        process = subprocess.Popen(command, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_started(pid: int) -> None:
    """Until the child has exec'd (its /proc entry shows the new program)."""
    for _ in range(100):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"time.sleep" in f.read():
                return
        time.sleep(0.02)


def test_the_session_is_the_watched_processes_and_all_their_descendants():
    """_record on a hand-made process table: descendants at any depth join, a process whose pid was
    taken by another (other start time) is dropped with what only it led to, others stay out.
    Planted: one level of descendants only, the start time not compared."""
    table = {
        1: (0, 10),  # watched
        2: (1, 11),  # its child
        3: (2, 12),  # its grandchild
        4: (3, 13),  # great-grandchild
        5: (9, 14),  # another's
        6: (0, 99),  # pid 6 was watched at start time 50: now another process
        7: (6, 100),  # the newcomer's child
    }
    assert watchdog._record({1: 10, 6: 50}, table) == {1: 10, 2: 11, 3: 12, 4: 13}
    assert watchdog._record({8: 1}, table) == {}


def test_proc_is_read_as_proc5_says_even_with_spaces_and_brackets_in_a_name(tmp_path, spawn):
    """_stat: (parent, start time) of a live process whose name holds ') ' (the fields after the
    last ')'), None for a zombie and for a pid that is gone. Planted: the fields split after the
    first ')', zombies counted as alive, the start time taken from another field."""
    odd = tmp_path / "a) b (c"
    odd.symlink_to(sys.executable)
    process = spawn([str(odd), "-c", "import time; time.sleep(60)"])
    parent, start = watchdog._stat(process.pid)
    assert parent == os.getpid()
    with open(f"/proc/{process.pid}/stat") as f:
        assert f.read().split()[21 + 2] == str(start)  # field 22; the name adds two more words here
    assert start >= watchdog._stat(os.getpid())[1]  # started after this test's process
    zombie = spawn([sys.executable, "-c", "pass"])  # ends, and is not waited for: a zombie
    for _ in range(250):
        with open(f"/proc/{zombie.pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.02)
    assert watchdog._stat(zombie.pid) is None and os.path.exists(f"/proc/{zombie.pid}")
    assert watchdog._processes()[process.pid] == (parent, start)
    assert 2**22 + 1 not in watchdog._processes() and watchdog._stat(2**22 + 1) is None


def test_a_process_is_signalled_only_if_it_is_still_the_one_recorded(spawn):
    """_signal compares the start time first: a process that took a recorded pid is left alone.
    Planted: the comparison dropped."""
    process = spawn()
    start = watchdog._start_time(process.pid)
    watchdog._signal(process.pid, start + 1, signal.SIGKILL)
    time.sleep(0.2)
    assert process.poll() is None
    watchdog._signal(process.pid, start, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL
    watchdog._signal(process.pid, start, signal.SIGKILL)  # gone: nothing raised


def test_workers_are_found_by_the_raylet_they_name(spawn):
    """_raylet_of reads RAY_RAYLET_PID from a process's environment (None when absent or not a
    number); _session adds the processes naming a root raylet that started after it (not an older
    raylet's that had the pid). Planted: the variable's prefix matched loosely, `start >=` made `>`
    or dropped, the orphans not added."""
    me, my_start = os.getpid(), watchdog._start_time(os.getpid())
    worker = spawn(env={**os.environ, "RAY_RAYLET_PID": str(me)})
    near = spawn(env={**os.environ, "RAY_RAYLET_PID_OLD": str(me)})
    bad = spawn(env={**os.environ, "RAY_RAYLET_PID": "12ab"})
    for process in (worker, near, bad):
        wait_started(process.pid)
    assert watchdog._raylet_of(worker.pid) == me
    assert watchdog._raylet_of(near.pid) is None and watchdog._raylet_of(bad.pid) is None
    assert watchdog._raylet_of(2**22 + 1) is None
    worker_start = watchdog._start_time(worker.pid)
    found = watchdog._session({}, {me: my_start})
    assert found.get(worker.pid) == worker_start
    assert near.pid not in found and bad.pid not in found
    assert worker.pid in watchdog._session({}, {me: worker_start})  # started at the same tick: ours
    # a worker's own child, which does not name the raylet, is the session's too
    leader_code = (
        "import os, subprocess, sys, time; env = dict(os.environ); env.pop('RAY_RAYLET_PID');"
        f"p = subprocess.Popen({SLEEP!r}, env=env); print(p.pid, flush=True); time.sleep(60)"
    )
    leader = spawn([sys.executable, "-c", leader_code], env={**os.environ, "RAY_RAYLET_PID": str(me)},
                   stdout=subprocess.PIPE, text=True)  # fmt: skip
    grandchild = int(leader.stdout.readline())
    leader.stdout.close()
    wait_started(grandchild)
    assert watchdog._raylet_of(grandchild) is None
    found = watchdog._session({}, {me: my_start})
    assert leader.pid in found and grandchild in found
    assert worker.pid not in watchdog._session({}, {me: worker_start + 1})  # an older raylet's worker


def test_stop_terminates_then_kills_what_ignores_sigterm(spawn, monkeypatch):
    """_stop: SIGTERM first (a process that obeys ends by it), SIGKILL after GRACE for one that
    ignores it, and their children too. Planted: SIGKILL never sent, children not followed, the
    first signal SIGKILL."""
    monkeypatch.setattr(watchdog, "GRACE", 0.5)
    stubborn_code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    obedient = spawn()
    stubborn = spawn([sys.executable, "-c", stubborn_code])
    with_child = f"import subprocess, time; p = subprocess.Popen({SLEEP!r}); print(p.pid, flush=True); time.sleep(60)"
    parent = spawn([sys.executable, "-c", with_child], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.stdout.close()
    for process in (obedient, stubborn):
        wait_started(process.pid)
    time.sleep(0.3)  # the stubborn one has set its handler
    watched = {p.pid: watchdog._start_time(p.pid) for p in (obedient, stubborn, parent)}
    began = time.monotonic()
    watchdog._stop(watched, {})
    assert obedient.wait(timeout=5) == -signal.SIGTERM
    assert parent.wait(timeout=5) == -signal.SIGTERM
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert time.monotonic() - began >= 0.5
    assert watchdog._stat(child) is None  # the child, found through its parent, ended too


def test_the_root_arguments_and_the_session_mention(spawn):
    """_parse reads pid:start; _mentions finds a text in a process's command line (a session folder
    among Ray's arguments). Planted: the fields swapped, the command line not read."""
    assert watchdog._parse("123:456") == (123, 456)
    process = spawn([*SLEEP, "--session-dir=/tmp/ray/session_2026-12-06_12-00-00_1"])
    wait_started(process.pid)
    assert watchdog._mentions(process.pid, "/tmp/ray/session_2026-12-06_12-00-00_1")
    assert not watchdog._mentions(process.pid, "/tmp/ray/session_2026-12-06_12-00-00_2")
    assert not watchdog._mentions(2**22 + 1, "")


def test_guard_watches_only_the_children_that_belong_to_the_session(spawn, monkeypatch):
    """guard() starts the watchdog over this process's children whose command line names the Ray
    session, not over its other children (a user's own subprocesses must outlive the job), and
    starts none when no child belongs to the session (a cluster connected to). The watchdog's launch
    is recorded, not run. Planted: every child taken as the session's (J-R4, issue 31's sixth
    mutation pass)."""
    session = "/tmp/ray/session_2026-12-06_22-00-00_42"
    ours = spawn([*SLEEP, f"--session-dir={session}"])
    other = spawn()
    for process in (ours, other):
        wait_started(process.pid)
    launched = []
    monkeypatch.setattr(watchdog.subprocess, "run", lambda command, **options: launched.append(command))
    assert watchdog.guard(session) is True
    roots = [arg for arg in launched[0] if not arg.startswith("--") and ":" in arg]
    assert roots == [f"{ours.pid}:{watchdog._start_time(ours.pid)}"]
    launched.clear()
    assert watchdog.guard("/tmp/ray/session_of_another_cluster") is False and not launched
