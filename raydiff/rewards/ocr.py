"""`ocr` reward: does the image show the prompt's quoted text? 1 − normalised edit distance.

Scoring follows Flow-GRPO's `flow_grpo/ocr.py` (yifan123/flow_grpo @ ac4c86e), which used PaddleOCR:
    target     = the text between the prompt's first pair of double quotes
    t, r       = target and recognised text, spaces removed, lower-cased
    dist       = 0 if t is a substring of r else Levenshtein(r, t), capped at len(t)
    score      = 1 − dist / len(t)                                    in [0, 1]
Recognition here is a transformers `VisionEncoderDecoderModel` loaded by path (TrOCR:
microsoft/trocr-base-printed, -large-printed, -small-printed) with its processor, greedy decoding.
TrOCR reads one text line, and there is no torchvision-free text detector in transformers, so the
recogniser reads `crops`: "image" (the whole image), "lines" (horizontal bands of high edge energy,
read top to bottom and joined), or "both" (default: the better of the two scores).
"""

from __future__ import annotations

import numpy as np
import torch

from raydiff.rewards.base import Reward, register_reward


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes; a clear error when there is none."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(f"ocr reward: prompt {prompt!r} has no quoted text; OCR prompts look like "
                         'A sign that says "OPEN"')
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; cost 1 each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_similarity(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR score of one image (see the module docstring)."""
    t = target.replace(" ", "").lower()
    r = recognised.replace(" ", "").lower()
    if not t:
        raise ValueError(f"ocr reward: target {target!r} is empty after removing spaces")
    dist = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - dist / len(t)


def text_lines(image: np.ndarray, min_height: int = 4, pad: int = 2) -> list[tuple[int, int]]:
    """Row bands (top, bottom) whose horizontal edge energy stands out: candidate text lines, top to bottom."""
    g = image.astype(np.float32).mean(-1)
    energy = np.abs(np.diff(g, axis=1)).mean(1)
    if energy.max() <= 0:
        return []
    on = energy > energy.mean() + 0.5 * energy.std()
    bands, start = [], None
    for y, v in enumerate(list(on) + [False]):
        if v and start is None:
            start = y
        elif not v and start is not None:
            if y - start >= min_height:
                bands.append((max(0, start - pad), min(len(g), y + pad)))
            start = None
    return bands


@register_reward("ocr")
class OcrReward(Reward):
    """1 − normalised edit distance between the prompt's quoted text and what a TrOCR-style model reads."""

    version = "trocr-editdist-1"
    range = (0.0, 1.0)

    def __init__(self, model_path: str = "microsoft/trocr-base-printed", crops: str = "both",
                 max_new_tokens: int = 32, device: str | None = None):
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        from raydiff.models.weights import resolve_weights
        from raydiff.rewards.clip_rewards import _default_device

        if crops not in ("image", "lines", "both"):
            raise ValueError(f"ocr.crops {crops!r} must be image, lines or both")
        path = resolve_weights(model_path, "ocr.model_path")
        self.crops, self.max_new_tokens, self.device = crops, max_new_tokens, _default_device(device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = VisionEncoderDecoderModel.from_pretrained(path).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def read(self, crops: list[np.ndarray]) -> list[str]:
        """Greedy transcription of each uint8 (H, W, 3) crop."""
        if not crops:
            return []
        pix = self.processor.image_processor(images=crops, return_tensors="pt").pixel_values.to(self.device)
        ids = self.model.generate(pix, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def recognise(self, images: np.ndarray) -> list[dict[str, str]]:
        """Per image {"image": text of the whole image, "lines": line texts joined} (keys as `crops` asks)."""
        out = [dict() for _ in images]
        if self.crops in ("image", "both"):
            for o, t in zip(out, self.read(list(images))):
                o["image"] = t
        if self.crops in ("lines", "both"):
            for o, img in zip(out, images):
                bands = text_lines(img)
                o["lines"] = " ".join(self.read([img[a:b] for a, b in bands]))
        return out

    def score_uint8(self, images, prompts):
        targets = [quoted_text(p) for p in prompts]
        return np.array([max(ocr_similarity(t, target) for t in rec.values())
                         for rec, target in zip(self.recognise(images), targets)], np.float32)
