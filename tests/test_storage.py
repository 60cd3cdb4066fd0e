"""Run storage on a local dir and on a real S3-API server (moto, 127.0.0.1): files, manifests, records, checksums."""

import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raydiff.engine import checkpoint as ckpt
from raydiff.engine.records import ExperienceWriter, epoch_files, read_experience
from raydiff.engine.storage import Storage, StorageError, check_reachable, join_uri, read_probe, run_location
from raydiff.models.lora import state_checksum


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "run")
    s3 = request.getfixturevalue("s3_server")
    return Storage(join_uri(s3.bucket_uri("unit"), f"run-{tmp_path.name}"))


def test_join_uri_keeps_query_options():
    uri = "s3://bkt/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(uri, "tiny", "checkpoints/") == "s3://bkt/runs/tiny/checkpoints?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("/a/b", "c") == "/a/b/c"


def test_run_location_resolves_relative_run_dir(tmp_path, monkeypatch):
    from raydiff.config import load_config

    monkeypatch.chdir(tmp_path)
    assert run_location(load_config(None, ["name=x"])) == str(tmp_path / "runs" / "x")
    cfg = load_config(None, ["name=x", "output.storage=s3://b/runs?endpoint_override=h:1&scheme=http"])
    assert run_location(cfg) == "s3://b/runs/x?endpoint_override=h:1&scheme=http"
    assert run_location(load_config(None, ["name=x", "output.storage=shared"])) == str(tmp_path / "shared" / "x")


def test_bad_uri_names_the_field():
    with pytest.raises(StorageError, match=r"output.storage='nosuch://x/y'.*s3://bucket/prefix"):
        Storage("nosuch://x/y")


def test_files_round_trip(store, tmp_path):
    store.write_bytes("a/b.txt", b"hello")
    assert store.read_bytes("a/b.txt") == b"hello" and store.exists("a/b.txt") and not store.exists("a/zz")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "y.bin").write_bytes(b"yy")
    files = store.upload_dir(src, "up")
    assert files == {"up/sub/y.bin": {"size": 2, "sha256": files["up/sub/y.bin"]["sha256"]},
                     "up/x.bin": {"size": 1000, "sha256": files["up/x.bin"]["sha256"]}}
    assert store.sizes("up") == {"sub/y.bin": 2, "x.bin": 1000}
    assert store.list("") == ["a", "up"]
    out = store.download_dir("up", tmp_path / "down")
    assert (out / "sub" / "y.bin").read_bytes() == b"yy" and (out / "x.bin").read_bytes() == b"x" * 1000
    again = pickle.loads(pickle.dumps(store))  # travels to Ray workers as its URI
    assert again.read_bytes("a/b.txt") == b"hello"
    store.delete("up")
    assert store.sizes("up") == {} and store.list("nothing") == []


def test_checkpoint_complete_only_with_manifest_written_last(store):
    def writer(payload: bytes):
        return lambda step: {**ckpt.write_file(step, "learner/w.bin", payload), **ckpt.write_file(step, "driver.pt", b"d")}

    for step in range(3):
        ckpt.save_checkpoint(store, step, writer(b"w" * (step + 1)), keep=2)
    assert [str(p).split("step_")[1][:6] for p in ckpt.complete_checkpoints(store)] == ["000001", "000002"]  # pruned
    # A crash mid-upload: files of step 3 without a manifest, and step 4 whose manifest lists a missing file.
    store.write_bytes("checkpoints/step_000003/learner/w.bin", b"partial")
    store.write_bytes("checkpoints/step_000004/MANIFEST.json",
                      json.dumps({"step": 4, "files": {"learner/w.bin": {"size": 4, "sha256": ""}}}).encode())
    # and step 5 whose listed file is shorter than the manifest says (upload cut off)
    store.write_bytes("checkpoints/step_000005/learner/w.bin", b"ab")
    store.write_bytes("checkpoints/step_000005/MANIFEST.json",
                      json.dumps({"step": 5, "files": {"learner/w.bin": {"size": 4, "sha256": ""}}}).encode())
    latest = ckpt.resolve_resume("auto", store)
    assert str(latest).split("?")[0].endswith("checkpoints/step_000002")
    # Driver state round trip through storage:
    ckpt.save_checkpoint(store, 6, lambda s: ckpt.save_driver_state(s, {"epoch": 6, "rng": torch.arange(3)}), keep=5)
    state = ckpt.load_driver_state(ckpt.latest_checkpoint(store))
    assert state["epoch"] == 6 and state["rng"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="output.resume=.*not a complete checkpoint"):
        ckpt.resolve_resume(join_uri(store.uri, "checkpoints/step_000004"), store)


def _batch(step: int, n: int = 4):
    from raydiff.types import Conditioning, Trajectory

    emb = torch.zeros(n, 2, 3)
    return Trajectory(prompts=[f"p{step}-{i}" for i in range(n)], latents=torch.zeros(n, 2, 1, 2, 2), timesteps=torch.tensor([1]),
                      log_probs=torch.zeros(n, 1), cond=Conditioning(emb, emb), images=np.zeros((n, 2, 2, 3), np.uint8),
                      version=step, num_steps=1, guidance_scale=1.0, eta=1.0, rewards=np.full(n, step, np.float32))


def test_records_one_complete_file_per_epoch_and_resume_never_duplicates(store):
    w = ExperienceWriter(store, 0)
    for step in range(5):
        w.write(step, _batch(step), step + 1, {"sample_s": 0.1})
    # Each epoch's file is a whole Parquet file (footer included) as soon as write() returns.
    assert list(epoch_files(store)) == [0, 1, 2, 3, 4]
    pq.read_metadata(io.BytesIO(store.read_bytes(epoch_files(store)[4])))
    # Resume from the checkpoint of epoch 2: the crashed run's epochs 3-4 go, the re-run writes them again.
    w = ExperienceWriter(store, 3)
    assert list(epoch_files(store)) == [0, 1, 2]
    for step in range(3, 6):
        w.write(step, _batch(step), step + 1, {"sample_s": 0.1})
    t = read_experience(store)
    assert t.num_rows == 6 * 4 and t.column("step").to_pylist() == [s for s in range(6) for _ in range(4)]


def test_checksum_independent_of_dtype_bf16_learner_fp32_rollout(tiny_sd):
    """A bf16 learner (DeepSpeed on GPU) publishes; an fp32 rollout worker loads it; verify_weights compares
    the learner's checksum with the worker's: they must agree, and still tell different values apart."""
    from raydiff.config import load_config
    from raydiff.engine.rollouts.worker import RolloutWorker
    from raydiff.models.lora import trainable_state_dict

    worker = RolloutWorker(load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}"]))
    learner_state = {k: (v + 0.01).to(torch.bfloat16) for k, v in trainable_state_dict(worker.model.unet).items()}
    update = {"version": 1, "state": learner_state, "checksum": state_checksum(learner_state)}
    assert worker.set_weights(update) is True
    version, rollout_checksum = worker.weights_checksum()
    assert next(p for p in worker.model.unet.parameters() if p.requires_grad).dtype == torch.float32
    assert (version, rollout_checksum) == (1, update["checksum"])
    # Still exact: one changed bf16 element changes the checksum.
    bumped = {k: v.clone() for k, v in learner_state.items()}
    first = next(iter(bumped.values())).view(-1)
    first[0] = first[0] * 1.5 + 0.25
    assert state_checksum(bumped) != rollout_checksum


def test_probe_names_the_role_that_cannot_read(tmp_path):
    store = Storage(tmp_path / "run")
    seen = []

    def learner_reads(uri, name):  # reads the probe from storage like a learner rank does
        seen.append(name)
        return [read_probe(uri, name)]

    def rollout_elsewhere(uri, name):  # a node whose local path is another disk: the file is not there
        return [read_probe(str(tmp_path / "other-node-disk"), name)]

    check_reachable(store, {"learner": learner_reads})
    assert seen and not store.exists(seen[0])  # the probe file is cleaned up
    with pytest.raises(StorageError, match=r"not reachable from every node \(rollout: FileNotFoundError.*shared storage"):
        check_reachable(store, {"learner": learner_reads, "rollout": rollout_elsewhere})
