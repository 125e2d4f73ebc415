"""A local Ray that dino3 starts ends with the process that started it, however that process ends.

Ray ties its GCS server and raylet to the driver (the kernel kills them when the driver dies), not what
the raylet starts: a driver killed with SIGKILL (or by the out-of-memory killer) left Ray's two agents
running for a minute more (they wait 60 s to report the raylet's death to a GCS that is gone) and a
worker still starting for ~25 s. No Ray option changes that, so `guard` starts a small watchdog process
beside the driver. It holds the read end of a pipe whose write end only the driver holds, and while the
driver lives it records the session's processes (the driver's children that belong to the session, and
their descendants) every INTERVAL seconds. When the pipe ends (the driver died, whatever the way), it
stops every one still alive, and the workers that the raylet started since the last record (orphans by
then: they name their raylet in RAY_RAYLET_PID), and those that appear meanwhile (SIGTERM, then SIGKILL
after GRACE seconds), and exits. Once they are all gone while the driver lives (Ray was shut down), it
just exits. It runs in its own session, so that a Ctrl-C or a kill
of the driver's process group leaves it to do its work. A pid is recorded with its start time, so that
a process that took the pid of one that ended is never signalled. Linux only (it reads /proc):
elsewhere no watchdog is started.

The watchdog runs this file as a script: the standard library only, no dino3 or Ray import.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

INTERVAL = 0.5  # seconds between two records of the session's processes while the driver lives
GRACE = 2.0  # seconds that the processes have to end after SIGTERM before SIGKILL (Ray's agents may ignore it)


def guard(session_dir: str) -> bool:
    """Start the watchdog over the local Ray session at `session_dir` if this process started it (some
    of its children belong to the session); whether one was started. Call it right after ray.init."""
    if not sys.platform.startswith("linux"):
        return False
    table = _processes()
    me = os.getpid()
    roots = [(pid, start) for pid, (parent, start) in table.items() if parent == me and _mentions(pid, session_dir)]
    if not roots:  # a cluster this process connected to: not ours to stop
        return False
    read_end, write_end = os.pipe()  # both not inheritable: only the watchdog gets the read end, as stdin
    try:
        subprocess.run(
            [sys.executable, "-I", os.path.abspath(__file__), f"--driver={me}", *(f"{p}:{s}" for p, s in roots)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            check=True,
            timeout=60,
        )  # returns as soon as the watchdog has forked itself away (see main)
    except (OSError, subprocess.SubprocessError):
        os.close(write_end)
        return False
    finally:
        os.close(read_end)
    # The write end stays open, owned by no object, until this process ends: then the watchdog reads EOF.
    return True


def main(argv: list[str]) -> None:
    roots = dict(_parse(a) for a in argv if not a.startswith("--"))
    if os.fork():  # the driver waits for this first process only; the second, orphaned, is reaped by init
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watched = _record(roots, _processes())
    while watched:
        if _driver_gone():
            _stop(watched, roots)
            return
        watched = _record(watched, _processes())
    if _driver_gone():  # it died as the last recorded process ended: a worker it was starting may be left
        _stop({}, roots)


def _driver_gone() -> bool:
    """Whether the pipe ended (waiting up to INTERVAL seconds): the driver is gone."""
    return bool(select.select([0], [], [], INTERVAL)[0]) and not os.read(0, 4096)


def _record(watched: dict[int, int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The watched processes still alive, and all their descendants."""
    alive = {pid: start for pid, start in watched.items() if pid in table and table[pid][1] == start}
    found = True
    while found:
        found = False
        for pid, (parent, start) in table.items():
            if parent in alive and pid not in alive:
                alive[pid] = start
                found = True
    return alive


def _session(watched: dict[int, int], roots: dict[int, int]) -> dict[int, int]:
    """`_record`, and the workers that the raylet (a root) started since the last record: it died with the
    driver, so they have another parent now; Ray gives each the pid of its raylet (RAY_RAYLET_PID)."""
    table = _processes()
    alive = _record(watched, table)
    for pid, (_, start) in table.items():
        raylet = _raylet_of(pid)
        if pid not in alive and raylet in roots and start >= roots[raylet]:  # not an older raylet's
            alive[pid] = start
    return _record(alive, table)


def _stop(watched: dict[int, int], roots: dict[int, int]) -> None:
    """SIGTERM the session's processes, and those that appear meanwhile (a raylet that outlived the driver
    by a moment starts workers); SIGKILL what is left after GRACE seconds."""
    began = time.monotonic()
    signalled = set()
    while watched := _session(watched, roots):
        late = time.monotonic() - began >= GRACE
        for process in watched.items():
            if late or process not in signalled:
                _signal(*process, signal.SIGKILL if late else signal.SIGTERM)
                signalled.add(process)
        if time.monotonic() - began >= 2 * GRACE:  # what a SIGKILL does not end (a process stuck in the kernel)
            return
        time.sleep(0.1)


def _signal(pid: int, start: int, number: int) -> None:
    if _start_time(pid) == start:  # still the process recorded, not another that took its pid
        with contextlib.suppress(OSError):  # ended since
            os.kill(pid, number)


def _processes() -> dict[int, tuple[int, int]]:
    """Every live process of the machine: pid -> (parent pid, start time in clock ticks since boot).
    Zombies count as ended."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            entry = _stat(int(name))
            if entry is not None:
                table[int(name)] = entry
    return table


def _start_time(pid: int) -> int | None:
    entry = _stat(pid)
    return entry[1] if entry is not None else None


def _stat(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    # fields[0] is the state (field 3 of proc(5)), [1] the parent pid, [19] the start time (field 22)
    return None if fields[0] in (b"Z", b"X") else (int(fields[1]), int(fields[19]))


def _raylet_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            variables = f.read().split(b"\0")
    except OSError:  # ended, or another user's
        return None
    for variable in variables:
        if variable.startswith(b"RAY_RAYLET_PID="):
            value = variable.partition(b"=")[2]
            return int(value) if value.isdigit() else None
    return None


def _mentions(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def _parse(argument: str) -> tuple[int, int]:
    pid, _, start = argument.partition(":")
    return int(pid), int(start)


if __name__ == "__main__":
    main(sys.argv[1:])
