"""Helpers for tests that run a private Ray head beside the session's cluster.

A private head gets its own temp dir; its processes are found (and stopped) by
that dir, never by `ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_pids(tmpdir: str) -> list[int]:
    """Ray processes of this cluster: every one names its session dir under TMPDIR.

    (Matching TMPDIR alone would also hit our parents, whose argv carries it.)"""
    marker = os.path.join(tmpdir, "session_").encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def kill_own(tmpdir: str, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process started for this cluster (named by TMPDIR)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = own_pids(tmpdir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while pids and time.time() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
            time.sleep(0.2)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


