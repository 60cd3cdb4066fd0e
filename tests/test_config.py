"""Config errors name the field and the fix; every field is documented; overrides parse."""

import subprocess
import sys

import pytest

from raydiff.config import ConfigError, RunConfig, load_config
from raydiff.config_base import undocumented_fields


def test_every_field_has_a_description():
    assert undocumented_fields(RunConfig) == []


def test_unknown_key_names_path_and_closest_name():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sampling.num_step=3"])
    msg = str(e.value)
    assert "sampling.num_step: unknown key" in msg and "did you mean 'num_steps'" in msg


def test_unknown_key_inside_algorithm():
    with pytest.raises(ConfigError, match=r"algorithm\.clip_rnge: unknown key \(did you mean 'clip_range'"):
        load_config(None, ["algorithm.clip_rnge=0.1"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"learner\.learning_rate: .*valid number.*got 'fast'"):
        load_config(None, ["learner.learning_rate=fast"])
    with pytest.raises(ConfigError, match=r"sampling\.num_steps: .*greater than or equal to 1"):
        load_config(None, ["sampling.num_steps=0"])


def test_overrides_apply_on_top_of_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sampling: {num_steps: 7}\ntrain: {num_epochs: 2}\n")
    cfg = load_config(str(f), ["train.num_epochs=5", "model.lora.target_modules=[to_q,to_v]"])
    assert (cfg.sampling.num_steps, cfg.train.num_epochs) == (7, 5)
    assert cfg.model.lora.target_modules == ["to_q", "to_v"]


def test_missing_config_file_and_model_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    from raydiff.models.loader import load_model

    cfg = load_config(None, [f"model.path={tmp_path}/no-such-model"])
    with pytest.raises(ConfigError, match=r"model.path .* does not exist"):
        load_model(cfg.model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without model_index.json"):
        load_model(load_config(None, [f"model.path={tmp_path}/empty"]).model)


def test_cli_print_config_and_error_exit_code():
    ok = subprocess.run([sys.executable, "-m", "raydiff.train", "configs/tiny_ddpo.yaml", "--print-config", "train.num_epochs=3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "num_epochs: 3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "raydiff.train", "configs/tiny_ddpo.yaml", "rollout.num_worker=2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "rollout.num_worker: unknown key" in bad.stderr and "num_workers" in bad.stderr


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_shipped_configs_validate(path):
    if path.endswith("rewards.yaml"):
        pytest.skip("reward service config has its own schema")
    load_config(path)
