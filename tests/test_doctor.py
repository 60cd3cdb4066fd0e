"""`raydiff doctor`: exit 0 for the embedded default, 1 with the reason when a run would fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "raydiff.cli", "doctor", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=300)


def test_doctor_passes_for_the_embedded_default():
    p = doctor("configs/tiny_ddpo.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    for what in ("python ", "torch ", "diffusers ", "ray ", "deepspeed ", "embedded mode", "devices:", "writable", "tiny://sd"):
        assert what in p.stdout, what
    assert "a run would start" in p.stdout
    assert "WARNING" not in p.stdout + p.stderr


def test_doctor_fails_for_a_model_path_that_does_not_resolve(tmp_path):
    p = doctor("configs/tiny_ddpo.yaml", f"model.path={tmp_path}/no-such-model")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL  model.path" in p.stdout and "does not resolve offline" in p.stdout
    assert "a run would fail" in p.stdout


def test_doctor_names_every_problem(tmp_path):
    """An unreachable cluster to join, an unwritable run dir and an uncached hub id: three FAIL lines, exit 1."""
    import socket

    (tmp_path / "file").write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: nothing answers
        p = doctor("configs/tiny_ddpo.yaml", f"output.run_dir={tmp_path}/file/run", "model.path=nobody/not-a-cached-model",
                   RAY_ADDRESS=f"127.0.0.1:{port}")
    assert p.returncode == 1, p.stdout
    assert f"join mode (RAY_ADDRESS=127.0.0.1:{port}) but nothing answers" in p.stdout
    assert "not a writable folder" in p.stdout
    assert "not in the Hugging Face cache" in p.stdout
    assert p.stdout.count("  FAIL  ") == 3
