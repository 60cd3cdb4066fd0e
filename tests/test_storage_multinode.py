"""Run storage on S3 across a real multi-node Ray cluster, through `ray job submit`.

Cluster (tests/_multinode.py): a head with no work resources (driver and job server only), a
`rollout` node and a `learner` node, each its own `ray start` with its own --temp-dir. Storage:
a real S3-API server (moto) on 127.0.0.1, reached as s3://BUCKET?endpoint_override=...&scheme=http.
Shown:
- tiny async DDPO (2 DeepSpeed ranks) puts every artefact in the bucket and nothing durable under
  any node's copy of the job's working dir;
- a job stopped mid-run and submitted again resumes from the bucket, and (S = 0) its final weights
  are bit-identical to the uninterrupted run's; its experience records hold every epoch once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _checkpoints import assert_same_weights, final_weights  # noqa: E402
from _multinode import REPO, MultiNodeCluster  # noqa: E402

from raydiff.engine import checkpoint as ckpt  # noqa: E402
from raydiff.engine.metrics import read_metrics  # noqa: E402
from raydiff.engine.records import read_experience  # noqa: E402
from raydiff.engine.storage import Storage, join_uri  # noqa: E402

pytestmark = pytest.mark.slow
EPOCHS = 4
SAMPLES_PER_EPOCH = 16  # 1 rollout worker x 2 batches x 8


@pytest.fixture(scope="module")
def cluster(s3_server):
    c = MultiNodeCluster(name="rdst", dashboard=True)
    c.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{c.env.get('PATH', '')}"  # the job's `python`: this venv
    c.env.update(s3_server.env)  # every node reaches the bucket with these credentials
    with c:
        # Room for two runs at once (1 rollout worker and 2 learner ranks each).
        c.rollout_node = c.add_node(num_cpus=2, resources={"rollout": 2})
        c.learner_node = c.add_node(num_cpus=4, resources={"learner": 4})
        yield c


def _cli(cluster, command: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", command, f"--address={cluster.job_address}", *args],
                          cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _submit(cluster, job_id: str, storage: str, name: str, *overrides: str) -> None:
    runtime_env = {"env_vars": {"RAYDIFF_CACHE": os.environ["RAYDIFF_CACHE"], "HF_HUB_OFFLINE": "1"},
                   "excludes": ["runs/", ".git/", "*.log"]}
    _cli(cluster, "submit", "--no-wait", f"--submission-id={job_id}", "--working-dir", ".",
         f"--runtime-env-json={json.dumps(runtime_env)}", "--",
         "python", "-m", "raydiff.train", "configs/tiny_ddpo_async.yaml", f"name={name}", f"output.storage={storage}",
         f"train.num_epochs={EPOCHS}", "train.max_staleness=0", "sampling.num_steps=3",
         "rollout.num_workers=1", "rollout.resources={rollout: 1}", "learner.num_workers=2", "learner.resources={learner: 1}",
         "output.checkpoint_every=1", "output.progress=false", *overrides)


def _status(cluster, job_id: str) -> str:
    """SUCCEEDED, FAILED, STOPPED, or the catch-all status (PENDING, RUNNING) as `ray job status` prints them."""
    out = _cli(cluster, "status", job_id)
    for text, state in ((f"Job '{job_id}' succeeded", "SUCCEEDED"), (f"Job '{job_id}' failed", "FAILED"),
                        (f"Job '{job_id}' was stopped", "STOPPED")):
        if text in out:
            return state
    m = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", out)
    return m.group(1).split(".")[-1] if m else out


def _wait(cluster, job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while (state := _status(cluster, job_id)) in ("RUNNING", "PENDING") and time.time() < deadline:
        time.sleep(2)
    if state != "SUCCEEDED":
        logs = _cli(cluster, "logs", job_id)
        raise AssertionError(f"job {job_id} ended {state}:\n{logs[-6000:]}")
    return state


def _working_dir_outputs(cluster) -> list[str]:
    """Run outputs found under any node's unpacked copy of a job's working dir (there must be none)."""
    found = []
    for node in cluster.nodes:
        for pkg in Path(node.temp_dir).glob("session_*/runtime_resources/working_dir_files/*"):
            for f in pkg.rglob("*"):
                rel = f.relative_to(pkg).as_posix()
                if f.is_file() and (rel.startswith("runs") or f.name in ("metrics.jsonl", "MANIFEST.json", "driver.pt")
                                    or f.suffix == ".parquet" or "tfevents" in f.name):
                    found.append(str(f))
    return found


@pytest.fixture(scope="module")
def runs(cluster, s3_server):
    """An uninterrupted run, and beside it (the nodes fit both) a run stopped after its first
    checkpoint and then submitted again with resume=auto. Returns (full, resumed, stopped_at)."""
    storage = s3_server.bucket_uri("mnruns")
    full, resumed = Storage(join_uri(storage, "full")), Storage(join_uri(storage, "resumed"))
    _submit(cluster, "raydiff-storage-full", storage, "full")
    _submit(cluster, "raydiff-storage-a", storage, "resumed")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.job_address)  # HTTP: stops within an epoch, unlike a fresh CLI process
    deadline = time.time() + 600
    while ckpt.latest_checkpoint(resumed) is None:
        assert time.time() < deadline and not client.get_job_status("raydiff-storage-a").is_terminal(), \
            _cli(cluster, "logs", "raydiff-storage-a")[-6000:]
        time.sleep(0.2)
    client.stop_job("raydiff-storage-a")
    while not client.get_job_status("raydiff-storage-a").is_terminal():
        time.sleep(0.5)
    assert _status(cluster, "raydiff-storage-a") == "STOPPED"  # stopped mid-run, not finished
    stopped_at = int(str(ckpt.latest_checkpoint(resumed)).split("step_")[1][:6])
    _wait(cluster, "raydiff-storage-full")
    _submit(cluster, "raydiff-storage-b", storage, "resumed", "output.resume=auto")
    _wait(cluster, "raydiff-storage-b")
    return full, resumed, stopped_at


def test_every_artefact_in_the_bucket_nothing_in_the_working_dir(cluster, runs):
    uninterrupted = runs[0]
    files = uninterrupted.sizes()
    names = set(files)
    assert {"config.yaml", "metrics.jsonl", "logs/console.log"} <= names, sorted(names)
    assert {f"samples/step_{e:06d}.png" for e in range(EPOCHS)} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert {f"experience/epoch-{e:06d}.parquet" for e in range(EPOCHS)} <= names
    last = f"checkpoints/step_{EPOCHS - 1:06d}"
    assert {f"{last}/MANIFEST.json", f"{last}/driver.pt", f"{last}/config.yaml", f"{last}/learner/learner.pt",
            f"{last}/learner/export/pytorch_lora_weights.safetensors"} <= names
    for rank in (0, 1):  # both DeepSpeed ranks uploaded their shard from the learner node
        assert f"{last}/learner/deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
    manifest = json.loads(uninterrupted.read_bytes(f"{last}/MANIFEST.json"))
    assert all(files[f"{last}/{k}"] == v["size"] for k, v in manifest["files"].items())
    assert [r["step"] for r in read_metrics(uninterrupted)] == list(range(EPOCHS))
    assert _working_dir_outputs(cluster) == []


def test_stopped_job_resubmitted_resumes_bit_identical(runs):
    full_run, run, stopped_at = runs
    assert stopped_at < EPOCHS - 1
    assert "resumed from" in run.read_bytes("logs/console.log").decode()
    assert_same_weights(final_weights(run), final_weights(full_run), "the uninterrupted run's (S=0 resume not bit-identical)")
    # Every epoch logged and recorded exactly once, although epochs after the checkpoint ran twice.
    assert [r["step"] for r in read_metrics(run)] == list(range(EPOCHS))
    rows = read_experience(run)
    assert rows.num_rows == EPOCHS * SAMPLES_PER_EPOCH
    assert rows.column("step").to_pylist() == [e for e in range(EPOCHS) for _ in range(SAMPLES_PER_EPOCH)]
