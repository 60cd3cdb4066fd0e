"""The README's "Query the rewards" lines, run verbatim against the service they start.

Substituted: only the port (8000 -> a free one). Added: HOME and RAY_TMPDIR are temp dirs (Ray's token
and files stay private), and one extra curl before the block's own `kill %1` checks that a request
without the bearer token is refused. The script runs in its own session; its process group is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _private_head import free_port, stop_group  # noqa: E402
from _readme import REPO, bash_block  # noqa: E402


@pytest.mark.slow
def test_readme_curl_lines_verbatim(tmp_path):
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the README lines activate ./.venv: run ./install.sh first")
    port = free_port()
    block = bash_block("Query the rewards")
    assert "8000" in block and "kill %1" in block
    lines = block.replace("8000", str(port)).rstrip("\n").splitlines()
    assert lines[-1].startswith("kill %1")
    check = f"curl -s -o /dev/null -w 'no token: %{{http_code}}\\n' http://127.0.0.1:{port}/v1/rewards"
    script = "\n".join(lines[:-1] + [check, lines[-1], "wait"])
    ray_tmp = f"/tmp/rdsv-{os.getpid()}"
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "RAYDIFF_REWARD_TOKEN")}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        try:
            stop_group(proc)  # the script, `raydiff serve-rewards` and its embedded cluster; asserts all gone
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        (REPO / "white.png").unlink(missing_ok=True)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    replies = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert len(replies) == 3, out
    catalogue, png, raw = replies
    assert {r["name"] for r in catalogue["rewards"]} >= {"brightness", "jpeg_compressibility"}
    assert png["errors"] == [None] and png["scores"] == [pytest.approx(1.0)]
    assert raw["errors"] == [None] and raw["scores"] == [pytest.approx(0.0)]
    assert "no token: 401" in out
