"""GenEval rules on hand-made detections; the geneval reward end to end on a tiny OWLv2 + tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydiff.rewards import geneval_rules as R
from raydiff.rewards.geneval_rules import Detection


def D(label, box, score=0.95, color=None):
    return Detection(tuple(float(v) for v in box), score, label, color)


LEFT, RIGHT = (0, 40, 20, 60), (60, 40, 80, 60)  # same row, far apart
TOP, BOTTOM = (40, 0, 60, 20), (40, 60, 60, 80)

SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
COUNT = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
COLOR = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]}
ATTR = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                          {"class": "apple", "count": 1, "color": "black"}]}
CARS = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}


def POS(rel):
    return {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": [rel, 0]}]}


# (name, metadata, raw detections, strict, partial, flow_grpo score, flow_grpo exact-count correct)
CASES = [
    ("single ok", SINGLE, [D("dog", LEFT)], True, 1.0, 1.0, True),
    ("single below threshold", SINGLE, [D("dog", LEFT, 0.25)], False, 0.0, 0.0, False),
    ("single at threshold is dropped (> 0.3)", SINGLE, [D("dog", LEFT, 0.3)], False, 0.0, 0.0, False),
    ("single, wrong class", SINGLE, [D("cat", LEFT)], False, 0.0, 0.0, False),
    ("two ok", TWO, [D("cat", LEFT), D("dog", RIGHT)], True, 1.0, 1.0, True),
    ("two, one missing", TWO, [D("cat", LEFT)], False, 0.5, 0.5, False),
    # GenEval needs >= count; Flow-GRPO's reward wants exact counts (1 - |1-2|/1 = 0 for the cats).
    ("two, extra cat", TWO, [D("cat", LEFT), D("cat", TOP), D("dog", RIGHT)], True, 1.0, 0.5, False),
    # Three cats: Flow-GRPO's count credit goes negative (1 - 2/1 = -1): (-1 + 1) / 2 = 0.
    ("two, three cats", TWO, [D("cat", LEFT), D("cat", TOP), D("cat", BOTTOM), D("dog", RIGHT)], True, 1.0, 0.0, False),
    ("count ok", COUNT, [D("clock", LEFT), D("clock", RIGHT)], True, 1.0, 1.0, True),
    # Counting uses the 0.9 threshold: a 0.85 clock is not counted. partial = (1/2 + 1) / 2.
    ("count, one under 0.9", COUNT, [D("clock", LEFT), D("clock", RIGHT, 0.85)], False, 0.75, 0.5, False),
    ("count, too many (exclude)", COUNT, [D("clock", LEFT), D("clock", RIGHT), D("clock", TOP)], False, 0.5, 0.5, False),
    ("count, none", COUNT, [], False, 0.5, 0.0, False),
    ("colour ok", COLOR, [D("fire hydrant", LEFT, color="blue")], True, 1.0, 1.0, True),
    ("colour wrong", COLOR, [D("fire hydrant", LEFT, color="red")], False, 0.5, 0.5, False),
    ("colour, object missing", COLOR, [], False, 0.0, 0.0, False),
    ("attr ok", ATTR, [D("wine glass", LEFT, color="purple"), D("apple", RIGHT, color="black")], True, 1.0, 1.0, True),
    ("attr, apple red", ATTR, [D("wine glass", LEFT, color="purple"), D("apple", RIGHT, color="red")], False, 0.75, 0.75, False),
    # Only the `count` most confident objects are colour-checked: [red 0.99, blue 0.9] fails, the red 0.5 is
    # ignored. reward-server: 3 cars for 2 -> 1 - 1/2, not exact -> colour 0: (0.5 + 0) / 2.
    ("two red cars, best two not both red", CARS, [D("car", LEFT, 0.99, "red"), D("car", RIGHT, 0.9, "blue"),
                                                    D("car", TOP, 0.5, "red")], False, 0.75, 0.25, False),
    ("two red cars ok", CARS, [D("car", LEFT, 0.99, "red"), D("car", RIGHT, 0.9, "red")], True, 1.0, 1.0, True),
    ("right of ok", POS("right of"), [D("teddy bear", LEFT), D("dog", RIGHT)], True, 1.0, 1.0, True),
    # Failed relation: partial (1 + 1 + 0) / 3; reward-server appends 0.0 and then 1.0: (1 + 1 + 0 + 1) / 4.
    ("right of, dog on the left", POS("right of"), [D("teddy bear", RIGHT), D("dog", LEFT)], False, 2 / 3, 0.75, False),
    ("left of ok", POS("left of"), [D("teddy bear", RIGHT), D("dog", LEFT)], True, 1.0, 1.0, True),
    ("above ok", POS("above"), [D("teddy bear", BOTTOM), D("dog", TOP)], True, 1.0, 1.0, True),
    ("below ok", POS("below"), [D("teddy bear", TOP), D("dog", BOTTOM)], True, 1.0, 1.0, True),
    ("below, dog above", POS("below"), [D("teddy bear", BOTTOM), D("dog", TOP)], False, 2 / 3, 0.75, False),
    # Centres 4 px apart horizontally with 20 px boxes: shrunk offset is 0 -> no relation at all.
    ("overlapping boxes, no relation", POS("right of"), [D("teddy bear", (40, 40, 60, 60)), D("dog", (44, 40, 64, 60))],
     False, 2 / 3, 0.75, False),
    # No target: GenEval fails on the missing bear; position credit 0; reward-server appends 0 for the position.
    ("position, target missing", POS("right of"), [D("dog", RIGHT)], False, 1 / 3, 1 / 3, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rules_table(case):
    _, meta, raw, want_strict, want_partial, want_fg, want_fg_ok = case
    objects = R.select(raw, meta["tag"])
    v = R.strict(objects, meta)
    assert v.correct is want_strict, v.reason
    assert (v.reason == "") == want_strict
    assert R.partial(objects, meta) == pytest.approx(want_partial)
    assert (R.partial(objects, meta) == 1.0) == want_strict  # partial is 1 exactly when strict passes
    ok, fg = R.flow_grpo(objects, meta)
    assert fg == pytest.approx(want_fg) and ok is want_fg_ok


def test_strict_reasons_name_the_failure():
    assert R.strict(R.select([D("clock", LEFT)], "counting"), COUNT).reason == "expected clock>=2, found 1"
    v = R.strict(R.select([D("fire hydrant", LEFT, color="red")], "colors"), COLOR)
    assert v.reason.startswith("expected blue fire hydrant>=1, found 0 blue; and 1 red")
    v = R.strict(R.select([D("teddy bear", RIGHT), D("dog", LEFT)], "position"), POS("right of"))
    assert v.reason == "expected dog right of target, found left of target"


def test_relative_position_by_hand():
    a, b = D("x", (0, 0, 10, 10)), D("y", (30, 0, 40, 10))
    # offset (-30, 0); shrunk by 0.1 * (10 + 10) = 2 -> (-28, 0) / 30 = -0.93 < -0.5
    assert R.relative_position(a, b) == {"left of"} and R.relative_position(b, a) == {"right of"}
    # diagonal: offset (-20, -20) -> (-18, -18) / 28.28 = -0.64 on both axes
    assert R.relative_position(a, D("y", (20, 20, 30, 30))) == {"left of", "above"}
    # mostly vertical: offset (-3, -30): x shrinks to 0, y -> -28/30.1 -> only "above"
    assert R.relative_position(D("x", (0, 0, 10, 10)), D("y", (3, 30, 13, 40))) == {"above"}
    # a larger position threshold swallows the offset
    assert R.relative_position(a, b, threshold=1.5) == set()


def test_select_sorts_caps_and_filters_overlap():
    raw = [D("cat", (0, 0, 10, 10), 0.5), D("cat", (1, 1, 11, 11), 0.95), D("cat", (50, 50, 60, 60), 0.7)]
    got = R.select(raw, "two_object")["cat"]
    assert [d.score for d in got] == [0.95, 0.7, 0.5]  # most confident first, GenEval keeps overlaps (1.0)
    assert [d.score for d in R.select(raw, "two_object", max_overlap=0.5)["cat"]] == [0.95, 0.7]
    many = [D("cat", (i, i, i + 5, i + 5), 0.4 + i / 100) for i in range(20)]
    assert len(R.select(many, "two_object")["cat"]) == 16
    assert R.select(raw, "counting") == {"cat": [raw[1]]}  # only > 0.9 counts
    assert R.select([D("cat", LEFT, 0.9)], "counting") == {}
    # iou by hand: boxes 11x11 px (inclusive), overlap 10x10 -> 100 / (121 + 121 - 100)
    assert R.compute_iou((0, 0, 10, 10), (1, 1, 11, 11)) == pytest.approx(100 / 142)


def test_nms_by_hand():
    from raydiff.rewards.detector import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 4.0]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7])
    # box1 vs box0: IoU 90/110 = 0.82 -> dropped; box3 vs box1: 36/(100+40-36) = 0.35 -> kept at 0.5
    assert nms(boxes, scores, 0.5) == [1, 2, 3]
    assert nms(boxes, scores, 0.3) == [1, 2]


# ---- the reward on tiny random models ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_owl(tmp_path_factory):
    from raydiff.rewards.tiny_builders import build_tiny_owl

    return build_tiny_owl(tmp_path_factory.mktemp("geneval") / "owl")


def test_detector_output_well_formed(tiny_owl):
    from raydiff.rewards.detector import OwlDetector
    from raydiff.rewards.geneval import object_names

    names = object_names()
    assert len(names) == 80 and names[0] == "person" and "teddy bear" in names
    det = OwlDetector(tiny_owl, names, torch.device("cpu"), min_score=0.0, nms_iou=0.5)
    imgs = np.random.default_rng(0).integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)
    out = det(imgs)
    assert len(out) == 2 and all(len(d) > 0 for d in out)
    for d in out[0]:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 48 and d.label in names and 0 <= d.score <= 1
    # class-wise NMS: no two kept boxes of one class overlap at IoU >= 0.5
    from raydiff.rewards.detector import nms

    for cls in {d.label for d in out[0]}:
        same = [d for d in out[0] if d.label == cls]
        b = torch.tensor([d.box for d in same])
        assert len(nms(b, torch.tensor([d.score for d in same]), 0.5)) == len(same)


def hub_layout(folder, tmp_path, image_processor_type: str) -> str:
    """A copy of a tiny build laid out as hub folders are (preprocessor_config.json with the plain class name)."""
    import json
    import shutil

    out = tmp_path / "hub"
    shutil.copytree(folder, out)
    pc = json.loads((out / "processor_config.json").read_text())
    ip = pc.pop("image_processor")
    ip["image_processor_type"] = image_processor_type
    (out / "processor_config.json").write_text(json.dumps(pc))
    (out / "preprocessor_config.json").write_text(json.dumps(ip))
    return str(out)


def test_hub_layout_loads_without_torchvision(tiny_owl, tmp_path):
    """google/owlv2-* name Owlv2ImageProcessor; without torchvision transformers must pick the PIL backend."""
    import importlib.util

    from raydiff.rewards.detector import OwlDetector

    assert importlib.util.find_spec("torchvision") is None
    det = OwlDetector(hub_layout(tiny_owl, tmp_path, "Owlv2ImageProcessor"), ["cat", "dog"], torch.device("cpu"), 0.0)
    assert type(det.processor.image_processor).__name__ == "Owlv2ImageProcessorPil"
    assert len(det(np.zeros((1, 30, 40, 3), np.uint8))) == 1


def test_colour_classifier_is_geneval_zero_shot():
    from raydiff.rewards.geneval import COLOR_TEMPLATES, ClipColours

    cc = ClipColours("tiny://clip", torch.device("cpu"))
    img = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    got = cc(img, [(0, 0, 20, 20), (10, 5, 40, 40)], "car")
    assert len(got) == 2 and set(got) <= set(R.COLORS)
    # by hand: mean of the 3 normalised template embeddings per colour, argmax of cos with the crop
    with torch.no_grad():
        rows = []
        for c in R.COLORS:
            tok = cc.tokenizer([t.format(c=c, cls="car") for t in COLOR_TEMPLATES], padding=True, return_tensors="pt")
            e = cc.model.get_text_features(**tok).pooler_output
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(e / e.norm())
        crop = torch.from_numpy(img[5:40, 10:40].copy()).permute(2, 0, 1)[None].float() / 255
        f = cc.model.get_image_features(pixel_values=cc.preprocess(crop)).pooler_output
        want = R.COLORS[int((f @ torch.stack(rows).T).argmax())]
    assert got[1] == want


@pytest.mark.parametrize("mode", ["partial", "strict", "flow_grpo"])
def test_geneval_reward_end_to_end(tiny_owl, mode):
    from raydiff.rewards.base import make_reward

    # Thresholds 0 so the random detector finds things and every check runs (colour, position).
    r = make_reward("geneval", detector_path=tiny_owl, clip_path="tiny://clip", mode=mode, threshold=0.0,
                    counting_threshold=0.0)
    prompts = ["a photo of a dog right of a teddy bear", "a photo of two clocks",
               "a photo of a purple wine glass and a black apple", "a photo of a bench"]
    imgs = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    s = r(imgs, prompts)
    assert s.shape == (4,) and s.dtype == np.float32 and np.isfinite(s).all()
    res = r.evaluate(imgs, prompts)
    assert [x["tag"] for x in res] == ["position", "counting", "color_attr", "single_object"]
    for x, v in zip(res, s):
        assert v == pytest.approx(float(x["strict"]) if mode == "strict" else x[mode])
        assert (x["partial"] == 1.0) == x["strict"]
    assert r.info().version == f"geneval-owl-{mode}-1" and r.info().range == (0.0, 1.0)
    with pytest.raises(ValueError, match="no GenEval metadata for prompt 'a cat'.*metadata_path"):
        r(imgs[:1], ["a cat"])


def test_geneval_metadata_path_and_bad_mode(tiny_owl, tmp_path):
    from raydiff.rewards.base import make_reward

    meta = tmp_path / "train_metadata.jsonl"
    meta.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n')
    r = make_reward("geneval", detector_path=tiny_owl, clip_path="tiny://clip", metadata_path=str(meta))
    assert r.meta("a cat")["include"][0]["class"] == "cat" and r.meta("a photo of a bench")["tag"] == "single_object"
    with pytest.raises(ValueError, match="geneval.mode 'exact' is not one of partial, strict, flow_grpo"):
        make_reward("geneval", detector_path=tiny_owl, clip_path="tiny://clip", mode="exact")
    with pytest.raises(ValueError, match="expected an OWLv2 or OWL-ViT"):
        make_reward("geneval", detector_path="tiny://clip", clip_path="tiny://clip")


def test_geneval_table_by_hand():
    """GenEval's summary: accuracy per tag (score == 1), overall = mean over tags; failed images left out."""
    from raydiff.eval.geneval import geneval_markdown, geneval_table

    meta = [{"tag": "counting"}, {"tag": "single_object"}, {"tag": "position"}, {"tag": "counting"}]
    s = np.array([[1.0, 0.5], [np.nan, 1.0], [1.0, 1.0], [0.75, 0.0]])
    t = geneval_table(s, meta)
    assert list(t["tags"]) == ["single_object", "counting", "position"]  # GenEval's tag order
    assert t["tags"]["counting"] == {"prompts": 2, "images": 4, "correct": 1, "accuracy": 0.25,
                                     "mean_score": pytest.approx(2.25 / 4)}
    assert t["tags"]["single_object"]["images"] == 1 and t["tags"]["single_object"]["accuracy"] == 1.0
    assert t["overall"] == pytest.approx((0.25 + 1.0 + 1.0) / 3) and t["failed_images"] == 1
    assert t["correct_images"] == pytest.approx(4 / 7) and t["correct_prompts"] == pytest.approx(3 / 4)
    md = "\n".join(geneval_markdown({"reward": "geneval", "version": "v", "note": "", "policies": {"base": t}}))
    assert "| counting | 2 | 4 | 1 | 0.2500 | 0.5625 |" in md and "**0.7500**" in md
    with pytest.raises(ValueError, match="prompts, samples"):
        geneval_table(s[:2], meta)
