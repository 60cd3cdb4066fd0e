"""The README's first command, verbatim, in a fresh clone with a Debian-like (EXTERNALLY-MANAGED) python3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _readme import REPO, bash_block, fake_system_python  # noqa: E402


def _clean_env(bin_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _readme_line(prefix: str) -> str:
    lines = [ln for ln in bash_block("Two commands").splitlines() if ln.startswith(prefix)]
    assert lines, f"README 'Two commands' has no line starting {prefix!r}"
    return lines[0]


def test_install_says_apt_get_when_venv_is_missing(tmp_path):
    """Debian without python3-venv: no ensurepip, so `python3 -m venv` fails; the script must say what to install."""
    bin_dir = fake_system_python(tmp_path / "py", with_ensurepip=False)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    proc = subprocess.run(["./install.sh"], cwd=clone, env=_clean_env(bin_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "apt-get install python3-venv" in proc.stderr, proc.stderr
    assert not (clone / ".venv").exists()
    assert not any((tmp_path / "py" / "lib").glob("*/site-packages/*")), "installed into the system interpreter"


def test_readme_ci_line_is_the_readme_test_line():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _readme_line("./install.sh --test") in ci


@pytest.mark.slow
def test_readme_install_and_train_verbatim_on_externally_managed_python(tmp_path):
    bin_dir = fake_system_python(tmp_path / "py")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    line = _readme_line("./install.sh &&")
    proc = subprocess.run(["bash", "-c", line], cwd=clone, env=_clean_env(bin_dir), capture_output=True, text=True,
                          timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "created .venv" in out
    assert (clone / ".venv" / "bin" / "raydiff").is_file()
    assert not any((tmp_path / "py" / "lib").glob("*/site-packages/*")), "installed into the system interpreter"
    metrics = [json.loads(x) for x in (clone / "runs" / "tiny_ddpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 15 and all("reward/mean" in m for m in metrics)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"install/run left untracked files that .gitignore misses:\n{status}"
