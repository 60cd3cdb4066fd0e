"""`geneval` reward: GenEval's compositional checks from an open-vocabulary detector and CLIP colours.

Per image: look the prompt up in GenEval metadata (packaged `geneval_metadata.jsonl`, plus
`metadata_path` for training sets such as Flow-GRPO's `train_metadata.jsonl`), detect the 80
COCO classes with OWLv2 (`detector.py`), keep detections by GenEval's thresholds, classify
the colour of the crops the metadata asks about with CLIP zero-shot (GenEval's 10 colours and 3
templates), then apply GenEval's rules (`geneval_rules.py`).

`mode` picks the returned score:
    partial    (default, for training) mean credit over the checks in [0, 1]; 1.0 exactly when strict passes
    strict     GenEval's per-image correctness, 0 or 1 (the benchmark's number)
    flow_grpo  the partial score yifan123/reward-server computes for Flow-GRPO (exact counts, quirks kept)
`raydiff eval` derives the per-tag strict accuracy as `score == 1` (valid for partial and strict).

Weights (real runs): detector_path google/owlv2-base-patch16-ensemble (or google/owlvit-base-patch32),
clip_path openai/clip-vit-large-patch14 (GenEval's colour model is open_clip ViT-L-14 "openai": the same weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from raydiff.rewards import geneval_rules as rules
from raydiff.rewards.base import Reward, register_reward

MODES = ("partial", "strict", "flow_grpo")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def _prompts_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "prompts"


def object_names() -> list[str]:
    """GenEval's 80 detector classes (COCO), in its order."""
    return [x.strip() for x in (_prompts_dir() / "geneval_object_names.txt").read_text().splitlines() if x.strip()]


def load_metadata(paths: list[str | Path]) -> dict[str, dict]:
    """{prompt: metadata} from GenEval-format .jsonl files (keys prompt, tag, include[, exclude]); later files win."""
    index = {}
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "include" not in row or "tag" not in row:
                raise ValueError(f"{path}:{n}: GenEval metadata needs keys prompt, tag, include; got {sorted(row)}")
            index[row["prompt"]] = row
    return index


class ClipColours:
    """GenEval's zero-shot colour classifier: 100 · cos(crop, mean template embedding) over 10 colours."""

    def __init__(self, clip_path: str, device: torch.device):
        from transformers import CLIPModel, CLIPTokenizer

        from raydiff.rewards.clip_rewards import ClipPreprocess, _features, _processor_stats
        from raydiff.models.weights import resolve_weights

        path = resolve_weights(clip_path, "geneval.clip_path")
        self.device, self._features = device, _features
        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        mean, std = _processor_stats(path)
        self.preprocess = ClipPreprocess(self.model.config.vision_config.image_size, mean, std).to(device)
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, cls: str) -> torch.Tensor:
        """(10, D): per colour, the normalised mean of its normalised template embeddings."""
        if cls not in self._classifiers:
            rows = []
            for c in rules.COLORS:
                tok = self.tokenizer([t.format(c=c, cls=cls) for t in COLOR_TEMPLATES], padding=True,
                                     return_tensors="pt").to(self.device)
                e = self._features(self.model.get_text_features(**tok)).float()
                e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
                rows.append(e / e.norm())
            self._classifiers[cls] = torch.stack(rows)
        return self._classifiers[cls]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, boxes: list[tuple], cls: str) -> list[str]:
        """Colour names of the box crops of one uint8 (H, W, 3) image."""
        if not boxes:
            return []
        crops = []
        for x0, y0, x1, y1 in boxes:
            x0, y0 = int(max(0, round(x0))), int(max(0, round(y0)))
            x1, y1 = max(x0 + 1, int(round(x1))), max(y0 + 1, int(round(y1)))
            crop = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).permute(2, 0, 1)[None].float() / 255
            crops.append(self.preprocess(crop.to(self.device)))
        emb = self._features(self.model.get_image_features(pixel_values=torch.cat(crops))).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return [rules.COLORS[i] for i in (100.0 * emb @ self.classifier(cls).T).argmax(-1).tolist()]


@register_reward("geneval")
class GenEval(Reward):
    """GenEval checks per prompt; score by `mode` (partial credit by default, strict 0/1, or Flow-GRPO's)."""

    range = (0.0, 1.0)

    def __init__(self, detector_path: str = "google/owlv2-base-patch16-ensemble",
                 clip_path: str = "openai/clip-vit-large-patch14", mode: str = "partial",
                 metadata_path: str | list[str] | None = None, threshold: float = rules.THRESHOLD,
                 counting_threshold: float = rules.COUNTING_THRESHOLD, max_objects: int = rules.MAX_OBJECTS,
                 max_overlap: float = rules.NMS_THRESHOLD, position_threshold: float = rules.POSITION_THRESHOLD,
                 nms_iou: float = 0.5, device: str | None = None):
        from raydiff.rewards.clip_rewards import _default_device
        from raydiff.rewards.detector import OwlDetector

        if mode not in MODES:
            raise ValueError(f"geneval.mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.version = f"geneval-owl-{mode}-1"
        extra = [metadata_path] if isinstance(metadata_path, str) else list(metadata_path or [])
        self.metadata = load_metadata([_prompts_dir() / "geneval_metadata.jsonl", *extra])
        self.select_args = dict(threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects,
                                max_overlap=max_overlap)
        self.position_threshold = position_threshold
        from raydiff.models.weights import resolve_weights

        dev = _default_device(device)
        self.detector = OwlDetector(resolve_weights(detector_path, "geneval.detector_path"), object_names(), dev, min_score=min(threshold, counting_threshold),
                                    nms_iou=nms_iou)
        self.colours = ClipColours(clip_path, dev)

    def meta(self, prompt: str) -> dict:
        try:
            return self.metadata[prompt]
        except KeyError:
            raise ValueError(f"no GenEval metadata for prompt {prompt!r}; use GenEval prompts or pass "
                             "geneval.metadata_path=<jsonl with prompt, tag, include>") from None

    def evaluate(self, images: np.ndarray, prompts: list[str]) -> list[dict]:
        """Per image: {tag, strict, reason, partial, flow_grpo, flow_grpo_strict, detections}."""
        metas = [self.meta(p) for p in prompts]
        out = []
        for img, meta, raw in zip(images, metas, self.detector(images)):
            objects = rules.select(raw, meta["tag"], **self.select_args)
            for cls, n in rules.colour_requests(meta):
                found = objects.get(cls, [])[:n] if self.mode != "flow_grpo" else objects.get(cls, [])
                for d, c in zip(found, self.colours(img, [d.box for d in found], cls)):
                    d.color = c
            verdict = rules.strict(objects, meta, self.position_threshold)
            fg_ok, fg = rules.flow_grpo(objects, meta, self.position_threshold)
            out.append({"tag": meta["tag"], "strict": verdict.correct, "reason": verdict.reason,
                        "partial": rules.partial(objects, meta, self.position_threshold), "flow_grpo": fg,
                        "flow_grpo_strict": fg_ok,
                        "detections": {k: [(d.box, d.score, d.color) for d in v] for k, v in objects.items()}})
        return out

    def score_uint8(self, images, prompts):
        res = self.evaluate(images, prompts)
        if self.mode == "strict":
            return np.array([float(r["strict"]) for r in res], np.float32)
        return np.array([r[self.mode] for r in res], np.float32)
