"""`imagereward`: ImageReward (Xu et al. 2023, arXiv 2304.05977; THUDM/ImageReward) on transformers modules.

    image (N, 3, 224, 224) ─ BLIP ViT-L/16 (BlipVisionModel, post-LN) ─► image tokens (N, 197, 1024)
    prompt ─ BERT tokenizer (max 35) ─ BLIP text encoder with cross-attention (BlipTextModel) ─► h[:, 0] (N, 768)
    score = (MLP(h[:, 0]) − 0.16717362830052426) / 1.0333394966054072
MLP: Linear 768→1024→128→64→16→1 with dropouts, no activations (as published). Preprocessing:
bicubic resize of the shortest side to 224, centre crop, CLIP mean/std, in differentiable torch, so
`score_tensor` backpropagates to the image (ReFL uses ImageReward this way).

Weights: THUDM/ImageReward `ImageReward.pt` + `med_config.json`, converted once to a folder with
`python -m raydiff.rewards.convert_imagereward` (see that module); the folder holds
`imagereward_config.json`, `model.safetensors` and the BERT tokenizer with [DEC]/[ENC] added.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from raydiff.rewards.base import Reward, register_reward

CONFIG_NAME = "imagereward_config.json"
MEAN, STD = 0.16717362830052426, 1.0333394966054072


class RewardMLP(nn.Module):
    """ImageReward's head; state-dict keys `layers.{0,2,4,6,7}` as in ImageReward.pt's `mlp.*`."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP vision + BLIP text encoder (cross-attention) + MLP; `forward` returns the normalised score (N,)."""

    def __init__(self, vision_config: dict, text_config: dict, mean: float = MEAN, std: float = STD):
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(BlipVisionConfig(**vision_config))
        tc = BlipTextConfig(**text_config)
        tc.is_decoder = True  # builds the cross-attention blocks; forward runs bidirectionally (is_decoder=False)
        self.text = BlipTextModel(tc, add_pooling_layer=False)
        self.mlp = RewardMLP(tc.hidden_size)
        self.mean, self.std = mean, std

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_atts, is_decoder=False).last_hidden_state[:, 0, :].float()
        return ((self.mlp(h) - self.mean) / self.std).squeeze(-1)

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"vision_config": _plain(self.vision.config), "text_config": _plain(self.text.config),
               "mean": self.mean, "std": self.std, **(extra or {})}
        (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> tuple["ImageRewardModel", dict]:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"imagereward.model_path {str(folder)!r} has no {CONFIG_NAME}; convert ImageReward.pt "
                             "first: python -m raydiff.rewards.convert_imagereward ImageReward.pt med_config.json OUT")
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        model = cls(cfg["vision_config"], cfg["text_config"], cfg.get("mean", MEAN), cfg.get("std", STD))
        missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"imagereward weights in {str(folder)!r} do not match the architecture: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model, cfg


def _plain(config) -> dict:
    """The config fields needed to rebuild the module (drop transformers bookkeeping keys)."""
    d = config.to_dict()
    for k in ("architectures", "transformers_version", "model_type", "torch_dtype", "dtype", "_name_or_path"):
        d.pop(k, None)
    return d


@register_reward("imagereward")
class ImageReward(Reward):
    """ImageReward-v1.0 human-preference score (about −2..2), differentiable."""

    version = "imagereward-v1.0"
    differentiable = True
    range = (-2.5, 2.5)

    def __init__(self, model_path: str, device: str | None = None, dtype: str = "float32"):
        from transformers import AutoTokenizer

        from raydiff.models.weights import resolve_weights
        from raydiff.rewards.clip_rewards import ClipPreprocess, _default_device

        path = resolve_weights(model_path, "imagereward.model_path")
        self.device, self.dtype = _default_device(device), getattr(torch, dtype)
        model, cfg = ImageRewardModel.load(path)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = int(cfg.get("max_length", 35))
        self.input_size = int(cfg["vision_config"]["image_size"])
        self.preprocess = ClipPreprocess(self.input_size).to(self.device)

    def score_tensor(self, images, prompts):
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        pix = self.preprocess(images.to(self.device)).to(self.dtype)
        return self.model(pix, tok["input_ids"], tok["attention_mask"]).float()
