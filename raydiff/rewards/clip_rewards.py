"""CLIP-family rewards on transformers `CLIPModel`: aesthetic, clip_score, pickscore, hps.

All four are differentiable: preprocessing (resize shortest side, centre crop,
CLIP mean/std) is plain torch, so `score_tensor` keeps the graph from the
image to the score. Weights load from a hub id or a local folder with
`CLIPModel.from_pretrained`; `tiny://clip` resolves to the seeded tiny model
from `raydiff.models.tiny_clip` (tests, smoke runs), built on
demand by `raydiff.models.weights` (this module never imports the builder).

Weight sources (real runs):
    aesthetic  CLIP openai/clip-vit-large-patch14 + head sac+logos+ava1-l14-linearMSE.pth
               from github.com/christophschuhmann/improved-aesthetic-predictor
    clip_score openai/clip-vit-large-patch14
    pickscore  yuvalkirstain/PickScore_v1, processor/tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    hps        xswu/HPSv2 HPS_v2.1_compressed.pt (open_clip ViT-H-14) converted with
               `python -m raydiff.rewards.convert_open_clip`, tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K

Shapes: images (N, 3, H, W) float in [0, 1] -> pixel_values (N, 3, S, S) -> embeds (N, D) -> scores (N,).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from raydiff.rewards.base import Reward, register_reward
from raydiff.models.weights import resolve_weights as resolve_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipPreprocess(nn.Module):
    """Differentiable CLIPImageProcessor: bicubic resize of the shortest side to `size`, centre crop, normalise."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD, mode: str = "bicubic"):
        super().__init__()
        self.size, self.mode = int(size), mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> (N, 3, size, size) normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        s = self.size
        # Same rounding as transformers' get_resize_output_image_size(shortest_edge).
        nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        x = images.float()
        if (nh, nw) != (h, w):
            downscale = nh < h or nw < w
            x = F.interpolate(x, size=(nh, nw), mode=self.mode, align_corners=False, antialias=downscale)
            x = x.clamp(0.0, 1.0)  # PIL resizes uint8 and so clips bicubic overshoot
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top : top + s, left : left + s]
        return (x - self.mean) / self.std


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP; state-dict keys match sac+logos+ava1-l14-linearMSE.pth."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a plain state dict from .safetensors or a torch file (weights_only: no arbitrary pickle code)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _features(out) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling (projected embeds in pooler_output); 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _default_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ClipReward(Reward):
    """Shared loading and embedding code; subclasses combine image and text embeddings into a score."""

    differentiable = True
    needs_text = True

    def __init__(self, clip_path: str, processor_path: str | None = None, device: str | None = None,
                 dtype: str = "float32"):
        from transformers import CLIPModel

        self.clip_path = clip_path
        path = resolve_path(clip_path)
        proc = resolve_path(processor_path) if processor_path else path
        self.device = _default_device(device)
        self.dtype = getattr(torch, dtype)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        size = self.model.config.vision_config.image_size
        mean, std = _processor_stats(proc)
        self.preprocess = ClipPreprocess(size, mean, std).to(self.device)
        self.input_size = size
        self.tokenizer = None
        if self.needs_text:
            from transformers import CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(proc)
        self._text_cache: dict[str, torch.Tensor] = {}

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> L2-normalised (N, D); differentiable w.r.t. images."""
        pix = self.preprocess(images.to(self.device)).to(self.dtype)
        emb = _features(self.model.get_image_features(pixel_values=pix)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised (N, D); prompts repeat across a batch (several images per prompt), so embeds are cached."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            max_len = self.model.config.text_config.max_position_embeddings
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=max_len,
                                 return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(**tok)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def _has_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "vocab.json"))


def _processor_stats(path: str) -> tuple[tuple, tuple]:
    """image_mean / image_std from preprocessor_config.json when the folder has one, else CLIP's."""
    try:
        from transformers import CLIPImageProcessorPil

        p = CLIPImageProcessorPil.from_pretrained(path)
        return tuple(p.image_mean), tuple(p.image_std)
    except Exception:
        return CLIP_MEAN, CLIP_STD


@register_reward("aesthetic")
class Aesthetic(ClipReward):
    """LAION aesthetic score (about 1..10): MLP head on L2-normalised CLIP ViT-L/14 image embeds; ignores prompts."""

    version = "laion-improved-v2"
    needs_text = False
    range = (0.0, 10.0)

    def __init__(self, clip_path: str = "openai/clip-vit-large-patch14", head_path: str | None = None,
                 device: str | None = None, dtype: str = "float32"):
        if not head_path:
            raise ValueError(
                "aesthetic.head_path is required: the LAION head sac+logos+ava1-l14-linearMSE.pth from "
                "github.com/christophschuhmann/improved-aesthetic-predictor (or tiny://clip/aesthetic_head.pth)"
            )
        super().__init__(clip_path, None, device, dtype)
        sd = load_state_dict(resolve_path(head_path))
        if "layers.0.weight" not in sd:
            raise ValueError(f"aesthetic head {head_path!r} has keys {sorted(sd)[:6]}..., expected the LAION "
                             "layout layers.0.weight, layers.2.weight, ..., layers.7.weight")
        in_dim = sd["layers.0.weight"].shape[1]
        proj = self.model.config.projection_dim
        if in_dim != proj:
            raise ValueError(
                f"aesthetic head {head_path!r} expects {in_dim}-dim image embeds but CLIP {clip_path!r} projects "
                f"to {proj}; pair the ViT-L/14 head (768) with openai/clip-vit-large-patch14, or a tiny head with "
                "the tiny CLIP (tiny://clip/aesthetic_head.pth)"
            )
        self.head = AestheticHead(in_dim)
        self.head.load_state_dict({k: v.float() for k, v in sd.items()})
        self.head.to(self.device).eval().requires_grad_(False)

    def score_tensor(self, images, prompts):
        return self.head(self.image_embeds(images)).squeeze(-1)


@register_reward("clip_score")
class ClipScore(ClipReward):
    """CLIPScore without the clamp: 100 * cos(image, prompt) with openai/clip-vit-large-patch14."""

    version = "openai-vit-l14"
    range = (-100.0, 100.0)

    def __init__(self, clip_path: str = "openai/clip-vit-large-patch14", processor_path: str | None = None,
                 device: str | None = None, dtype: str = "float32"):
        super().__init__(clip_path, processor_path, device, dtype)

    def score_tensor(self, images, prompts):
        return 100.0 * self.cosine(images, prompts)


@register_reward("pickscore")
class PickScore(ClipReward):
    """PickScore: logit_scale.exp() * cos(image, prompt) (about 0..30) with yuvalkirstain/PickScore_v1."""

    version = "pickscore-v1"
    range = (0.0, 30.0)

    def __init__(self, clip_path: str = "yuvalkirstain/PickScore_v1", processor_path: str | None = None,
                 device: str | None = None, dtype: str = "float32"):
        # The PickScore_v1 repo ships no tokenizer; it was trained with the ViT-H-14 one. A local folder
        # that carries its own tokenizer (tiny, converted, re-saved) is used as is.
        if processor_path is None and not _has_tokenizer(resolve_path(clip_path)):
            processor_path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        super().__init__(clip_path, processor_path, device, dtype)

    def score_tensor(self, images, prompts):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


@register_reward("hps")
class HPS(ClipReward):
    """HPSv2.1: cos(image, prompt) (about 0.2..0.35) from xswu/HPSv2 HPS_v2.1_compressed.pt converted to transformers.

    `clip_path` is the folder written by `python -m raydiff.rewards.convert_open_clip --tokenizer
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K HPS_v2.1_compressed.pt out_dir`.
    """

    version = "hpsv2.1"
    range = (0.0, 1.0)

    def __init__(self, clip_path: str, processor_path: str | None = None, device: str | None = None,
                 dtype: str = "float32"):
        super().__init__(clip_path, processor_path, device, dtype)

    def score_tensor(self, images, prompts):
        return self.cosine(images, prompts)
