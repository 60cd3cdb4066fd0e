"""Flow-GRPO (tiny FLUX) and DiffusionNFT (tiny SD3) end to end on a local Ray cluster, asynchronously.

Short runs: they show the configs train through the whole engine with stale batches; the reward
rise is measured with the full configs (docs/algorithms/flow_grpo.md, nft.md).
"""

import numpy as np
import pytest
from conftest import train_config

from raydiff.engine.metrics import read_metrics
from raydiff.engine.records import read_experience

SHORT = ["train.num_epochs=4", "sampling.num_steps=4", "output.image_grid_every=0", "learner.engine=torch"]


@pytest.mark.slow
@pytest.mark.parametrize("config,loss_keys", [
    ("configs/tiny_flow_grpo_flux.yaml", ["train/policy_loss", "train/kl", "train/ratio_mean"]),
    ("configs/tiny_nft.yaml", ["train/positive_loss", "train/negative_loss", "train/old_decay", "train/kl"]),
])
def test_group_algorithm_trains_async(ray_cluster, tmp_path, config, loss_keys):
    cfg, run_dir = train_config(config, tmp_path, *SHORT)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(4))
    assert max(r["policy/staleness"] for r in rows) >= 1  # rollouts ran a version ahead
    for key in loss_keys:
        assert all(np.isfinite(r[key]) for r in rows), (key, [r.get(key) for r in rows])
    records = read_experience(run_dir).to_pandas()
    k = cfg.algorithm.group_size
    assert (records.groupby(["step", "group"]).size() == k).all()
    assert records.groupby(["step", "group"]).prompt.nunique().max() == 1
