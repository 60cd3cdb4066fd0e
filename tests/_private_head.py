"""Helpers for tests that run their own `ray start` beside the session's cluster.

Every `ray start` a test runs is `--block` under `Popen(start_new_session=True)`, so gcs, raylet,
dashboard, monitor and agents share its process group, and `stop_group` stops exactly that group
(never `ray stop`, never a kill by name, never a scan of the machine). Raylet puts each worker it
spawns in a process group of its own; those groups are found by walking the descendants of the
pid we started (recorded before the first signal) and stopped with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

STARTED = "Ray runtime started"  # what `ray start` prints once every process of the node is up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(args: list[str], env: dict, log_path: str, cwd: str | None = None) -> subprocess.Popen:
    """`ray start ARGS --block` in a new session (its pgid = its pid), output to log_path."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--block"], env=env, cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_started(proc: subprocess.Popen, log_path: str, timeout_s: float = 180) -> None:
    """Wait until the blocking `ray start` logs that its node is up (it never returns on its own)."""
    deadline = time.time() + timeout_s
    while True:
        with open(log_path, errors="replace") as f:
            text = f.read()
        if STARTED in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}):\n{text[-3000:]}")
        if time.time() > deadline:
            raise TimeoutError(f"ray start not up after {timeout_s}s:\n{text[-3000:]}")
        time.sleep(0.5)


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (a process this test started), via /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


def _groups_of(pids: list[int]) -> set[int]:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a pgid reused by someone else's process: not ours
        return False


def _signal(groups: set[int], sig: int) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(groups: set[int], procs: list, timeout_s: float) -> set[int]:
    deadline = time.time() + timeout_s
    while True:
        for p in procs:
            p.poll()  # reap our own child, or its zombie keeps the group alive
        alive = {g for g in groups if _alive(g)}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def stop_group(*procs: subprocess.Popen | int, grace_s: float = 5.0, kill_wait_s: float = 30.0) -> set[int]:
    """SIGTERM the process group of each started process (pgid = pid: they run in new sessions) and
    of every group its descendants escaped to; after grace_s, SIGKILL what is left. Returns the
    groups stopped; raises AssertionError if any of them still has a process afterwards."""
    popens = [p for p in procs if isinstance(p, subprocess.Popen)]
    pids = [p.pid if isinstance(p, subprocess.Popen) else int(p) for p in procs]
    groups = set(pids)
    for pid in pids:  # recorded before the first signal: once a parent dies its children are orphans
        groups |= _groups_of(descendants(pid))
    groups.discard(os.getpgrp())  # never our own group (a pid we were handed in it would take us down)
    print(f"stop_group: started {pids}, escaped groups {sorted(groups - set(pids))}", file=sys.stderr)
    _signal(groups, signal.SIGTERM)
    alive = _wait_gone(groups, popens, grace_s)
    if alive:
        before = set(groups)
        for pid in pids:  # anything spawned since (e.g. a worker restarted during shutdown)
            groups |= _groups_of(descendants(pid))
        groups.discard(os.getpgrp())
        print(f"stop_group: SIGKILL after {grace_s}s to {sorted(alive)} (+ new {sorted(groups - before)})", file=sys.stderr)
        _signal(groups, signal.SIGKILL)
        alive = _wait_gone(groups, popens, kill_wait_s)
    assert not alive, f"process groups still alive after SIGKILL: {sorted(alive)}"
    return groups
