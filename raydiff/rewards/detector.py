"""Open-vocabulary object detection (OWLv2 / OWL-ViT on transformers) over a fixed class list.

GenEval's reference detector is Mask2Former (mmdetection, needs torchvision); this one
runs on transformers + scipy only. Every class name becomes the text query
"a photo of a <class>"; the query embeddings are computed once. Each predicted box
(one per image patch) takes its best-scoring class, as transformers'
`post_process_object_detection` does, so classes compete for a box like the closed-set
COCO heads of Mask2Former. OWL predicts one box per patch, hence many near-duplicates:
a class-wise NMS at `nms_iou` turns that dense output into an object set (Mask2Former's
set prediction needs none; GenEval's own IoU filter stays off).

Shapes: images uint8 (N, H, W, 3) -> per image a list of `Detection` (box in input pixels).
"""

from __future__ import annotations

import numpy as np
import torch

from raydiff.rewards.geneval_rules import Detection


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy NMS (indices kept, best first); boxes (K, 4) xyxy. Plain torch: no torchvision."""
    order = scores.argsort(descending=True).tolist()
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if not order:
            break
        rest = boxes[order]
        x0 = torch.maximum(rest[:, 0], boxes[i, 0])
        y0 = torch.maximum(rest[:, 1], boxes[i, 1])
        x1 = torch.minimum(rest[:, 2], boxes[i, 2])
        y1 = torch.minimum(rest[:, 3], boxes[i, 3])
        inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
        area = lambda b: (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)  # noqa: E731
        ious = inter / (area(rest) + area(boxes[i]) - inter).clamp(min=1e-9)
        order = [j for j, v in zip(order, ious.tolist()) if v < iou]
    return keep


class OwlDetector:
    """Loads `Owlv2ForObjectDetection` (or `OwlViTForObjectDetection`) + its processor from `path`."""

    def __init__(self, path: str, class_names: list[str], device: torch.device, min_score: float = 0.05,
                 nms_iou: float = 0.5, template: str = "a photo of a {}"):
        from transformers import AutoConfig

        kind = AutoConfig.from_pretrained(path).model_type
        if kind == "owlv2":
            from transformers import Owlv2ForObjectDetection as Model
            from transformers import Owlv2Processor as Processor
        elif kind == "owlvit":
            from transformers import OwlViTForObjectDetection as Model
            from transformers import OwlViTProcessor as Processor
        else:
            raise ValueError(f"detector_path {path!r} holds a {kind!r} model; expected an OWLv2 or OWL-ViT "
                             "object detector, e.g. google/owlv2-base-patch16-ensemble")
        self.device, self.class_names, self.min_score, self.nms_iou = device, list(class_names), min_score, nms_iou
        self.processor = Processor.from_pretrained(path)
        self.model = Model.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.square_pad = kind == "owlv2"  # OWLv2 pads to a square (bottom/right) before resizing
        tok = self.processor.tokenizer([template.format(c) for c in self.class_names], padding="max_length",
                                       truncation=True, return_tensors="pt").to(device)
        base = getattr(self.model, "owlv2", None) or self.model.owlvit
        with torch.no_grad():
            self.queries = _pooled(base.get_text_features(**tok))[None]  # (1, C, D)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[list[Detection]]:
        pix = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        feature_map = self.model.image_embedder(pixel_values=pix)[0]
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        logits = self.model.class_predictor(feats, self.queries.expand(b, -1, -1))[0]  # (B, P, C)
        boxes = self.model.box_predictor(feats, feature_map)  # (B, P, 4) cx, cy, w, h in [0, 1]
        probs, labels = logits.sigmoid().max(-1)
        out = []
        for i, img in enumerate(images):
            H, W = img.shape[:2]
            sx, sy = (max(H, W), max(H, W)) if self.square_pad else (W, H)
            cx, cy, bw, bh = boxes[i].unbind(-1)
            xyxy = torch.stack([(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy], -1)
            xyxy = torch.stack([xyxy[:, 0].clamp(0, W), xyxy[:, 1].clamp(0, H), xyxy[:, 2].clamp(0, W),
                                xyxy[:, 3].clamp(0, H)], -1)
            dets = []
            for c in labels[i].unique().tolist():
                idx = ((labels[i] == c) & (probs[i] > self.min_score)).nonzero().flatten()
                if len(idx) == 0:
                    continue
                for k in nms(xyxy[idx], probs[i][idx], self.nms_iou):
                    j = idx[k]
                    dets.append(Detection(tuple(float(v) for v in xyxy[j].tolist()), float(probs[i][j]),
                                          self.class_names[c]))
            out.append(dets)
        return out
