"""GenEval's decision rules as pure functions over detections (boxes, labels, scores, colours).

Ported from djghosh13/geneval `evaluation/evaluate_images.py` @ af4902f (MIT); the
detector and the CLIP colour classifier live elsewhere (`geneval.py`), so every rule
here is testable with hand-made detections.

    select(raw, tag)            per class: score > threshold (0.9 for the counting tag, else 0.3),
                                highest score first, at most 16, then GenEval's IoU filter (off at 1.0)
    strict(objects, metadata)   GenEval's `evaluate`: every include clause has >= count objects (the
                                `count` most confident ones are checked), all of them of the asked
                                colour, each in the asked relation to every object of the target
                                clause (which must itself have passed); no exclude clause has
                                >= its count objects
    partial(objects, metadata)  raydiff's training score in [0, 1]: mean credit over the same checks
                                (count min(n, c)/c, colour and position as fractions, exclude 0/1);
                                it is 1 exactly when `strict` passes
    flow_grpo(objects, meta)    yifan123/reward-server `evaluate_reward` (what Flow-GRPO trains on),
                                quirks kept: exact counts, 1 − |c − n|/c (negative past 2c), excludes
                                ignored, a 1.0 credit appended after every position check

Position: box centres' offset minus 0.1 × the summed box sizes per axis (`relative_position`);
a relation holds when its component of the shrunk offset, over the raw offset's length, passes 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0  # GenEval's max_overlap: 1.0 keeps overlapping boxes
POSITION_THRESHOLD = 0.1


@dataclass
class Detection:
    """One detected object; `box` is (x0, y0, x1, y1) in pixels; `color` is filled by the colour classifier."""

    box: tuple[float, float, float, float]
    score: float
    label: str
    color: str | None = None


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str


def compute_iou(a, b) -> float:
    """GenEval's IoU (pixel-inclusive areas, +1)."""
    def area(bx):
        return max(bx[2] - bx[0] + 1, 0) * max(bx[3] - bx[1] + 1, 0)
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select(raw: list[Detection], tag: str, threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
           max_objects: int = MAX_OBJECTS, max_overlap: float = NMS_THRESHOLD) -> dict[str, list[Detection]]:
    """{class: detections kept, most confident first}, following GenEval's `evaluate_image`."""
    thr = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for d in raw:
        by_class.setdefault(d.label, []).append(d)
    out = {}
    for cls, dets in by_class.items():
        order = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[:max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            order = [d for d in order if max_overlap == 1 or compute_iou(best.box, d.box) < max_overlap]
        if kept:
            out[cls] = kept
    return out


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"); image y grows downwards."""
    boxes = np.array([a.box, b.box], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def colour_requests(metadata: dict) -> list[tuple[str, int]]:
    """(class, how many of its most confident detections need a colour) for the classifier to fill in."""
    return [(r["class"], r["count"]) for r in metadata.get("include", []) if "color" in r]


def strict(objects: dict[str, list[Detection]], metadata: dict, position_threshold: float = POSITION_THRESHOLD) -> Verdict:
    """GenEval's `evaluate`: include clauses AND-ed, exclude clauses OR-ed; see the module docstring."""
    correct, reason, matched_groups = True, [], []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        matched = True
        found = objects.get(cls, [])[:n]
        if len(found) < n:
            correct = matched = False
            reason.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < n:
                    correct = matched = False
                    reason.append(f"expected {req['color']} {cls}>={n}, found {colors.count(req['color'])} "
                                  f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                rel, target = req["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for t in matched_groups[target]:
                            true_rels = relative_position(obj, t, position_threshold)
                            if rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {cls} {rel} target, found {' and '.join(true_rels)} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls = req["class"]
        if len(objects.get(cls, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {cls}<{req['count']}, found {len(objects[cls])}")
    return Verdict(correct, "\n".join(reason))


def partial(objects: dict[str, list[Detection]], metadata: dict, position_threshold: float = POSITION_THRESHOLD) -> float:
    """Mean credit over GenEval's checks, in [0, 1]; equals 1.0 exactly when `strict(...).correct`."""
    credits: list[float] = []
    includes = metadata.get("include", [])
    for req in includes:
        cls, n = req["class"], req["count"]
        every = objects.get(cls, [])
        found = every[:n]
        credits.append(min(len(every), n) / n)
        if "color" in req:
            credits.append(sum(d.color == req["color"] for d in found) / n)
        if "position" in req:
            rel, target = req["position"]
            treq = includes[target]
            tfound = objects.get(treq["class"], [])[: treq["count"]]
            pairs = [(o, t) for o in found for t in tfound]
            ok = sum(rel in relative_position(o, t, position_threshold) for o, t in pairs)
            # Missing objects on either side count as failed pairs.
            credits.append(ok / (n * treq["count"]) if len(tfound) == treq["count"] else 0.0)
    for req in metadata.get("exclude", []):
        credits.append(1.0 if len(objects.get(req["class"], [])) < req["count"] else 0.0)
    return float(np.mean(credits)) if credits else 0.0


def flow_grpo(objects: dict[str, list[Detection]], metadata: dict,
              position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, float]:
    """(exact-count correct, score) as yifan123/reward-server `evaluate_reward` computes them, quirks included."""
    correct, rewards, matched_groups = True, [], []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        matched = True
        found = objects.get(cls, [])
        rewards.append(1 - abs(n - len(found)) / n)
        if len(found) != n:
            correct = matched = False
            if "color" in req or "position" in req:
                rewards.append(0.0)
        else:
            if "color" in req:
                hits = [d.color for d in found].count(req["color"])
                rewards.append(1 - abs(n - hits) / n)
                if hits != n:
                    correct = matched = False
            if "position" in req and matched:
                rel, target = req["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    rewards.append(0.0)
                else:
                    for obj in found:
                        for t in matched_groups[target]:
                            if rel not in relative_position(obj, t, position_threshold):
                                correct = matched = False
                                rewards.append(0.0)
                                break
                        if not matched:
                            break
                    rewards.append(1.0)  # reward-server appends this whether or not the check failed
        matched_groups.append(found if matched else None)
    return correct, (sum(rewards) / len(rewards) if rewards else 0.0)
