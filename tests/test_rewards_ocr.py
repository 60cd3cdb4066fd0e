"""OCR reward: edit-distance scoring by hand, the packaged prompt set, and the reward on a rendered text image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from raydiff.rewards.ocr import levenshtein, ocr_similarity, quoted_text, text_lines


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3),
                                    ("flaw", "lawn", 2), ("open", "open", 0), ("abc", "cab", 2)])
def test_levenshtein_by_hand(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


@pytest.mark.parametrize("recognised,target,want", [
    ("HELLO WORLD", "Hello World", 1.0),             # case and spaces ignored
    ("hell0 w0rld", "Hello World", 1 - 2 / 10),      # 2 substitutions over 10 letters
    ("xx open sign xx", "OPEN", 1.0),                # target found inside the reading: distance 0
    ("opn", "OPEN", 1 - 1 / 4),                      # one insertion
    ("", "OPEN", 0.0),                               # nothing read: distance = len(target)
    ("qwertyuiopasdfgh", "OPEN", 0.0),               # distance 15 capped at len(target) = 4
    ("fresh brea", "FRESH BREAD", 1 - 1 / 10),       # 'freshbread' has 10 letters
])
def test_ocr_similarity_by_hand(recognised, target, want):
    assert ocr_similarity(recognised, target) == pytest.approx(want)


def test_quoted_text():
    assert quoted_text('A sign that says "Hello World" at night') == "Hello World"
    assert quoted_text('two "A" and "B"') == "A"  # the first quoted span, as Flow-GRPO
    for bad in ["no quotes", 'one " only', 'empty "" quotes']:
        with pytest.raises(ValueError, match="has no quoted text"):
            quoted_text(bad)


def test_packaged_ocr_prompts_regenerate_and_parse():
    from raydiff.prompts import load_prompts
    from raydiff.prompts.ocr_prompts import TEST_PHRASES, TRAIN_PHRASES, prompt_sets

    here = Path(__file__).resolve().parent.parent / "raydiff" / "prompts"
    for name, prompts in prompt_sets().items():
        assert (here / name).read_text() == "\n".join(prompts) + "\n", f"{name} is stale: python -m raydiff.prompts.ocr_prompts"
    train, test = load_prompts("ocr_train"), load_prompts("ocr_test")
    assert len(train) == 800 == len(set(train)) and len(test) == 100 == len(set(test))
    assert {quoted_text(p) for p in train} <= set(TRAIN_PHRASES) and {quoted_text(p) for p in test} <= set(TEST_PHRASES)
    assert not set(TRAIN_PHRASES) & set(TEST_PHRASES)
    assert (here / "LICENSES" / "raydiff-ocr.txt").read_text().count("CC0") >= 1


def render(text_lines_: list[str], size=(96, 160)) -> np.ndarray:
    img = Image.new("RGB", (size[1], size[0]), (235, 230, 220))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=18)
    for i, line in enumerate(text_lines_):
        draw.text((8, 10 + 40 * i), line, fill=(20, 20, 20), font=font)
    return np.asarray(img)


def test_text_lines_find_rendered_lines():
    img = render(["HELLO", "WORLD"])
    bands = text_lines(img)
    assert len(bands) == 2
    (a0, a1), (b0, b1) = bands
    assert a0 <= 14 and 24 <= a1 <= b0 and 50 <= b0 and b1 <= 75  # text at y ~ 10..28 and 50..68
    assert text_lines(np.zeros((20, 20, 3), np.uint8)) == []


@pytest.fixture(scope="module")
def tiny_trocr(tmp_path_factory):
    from raydiff.rewards.tiny_builders import build_tiny_trocr

    return build_tiny_trocr(tmp_path_factory.mktemp("ocr") / "trocr")


@pytest.mark.parametrize("crops", ["image", "lines", "both"])
def test_ocr_reward_on_rendered_text(tiny_trocr, crops):
    from raydiff.rewards.base import make_reward

    r = make_reward("ocr", model_path=tiny_trocr, crops=crops, max_new_tokens=8)
    imgs = np.stack([render(["HELLO WORLD"]), render(["OPEN", "LATE"])])
    prompts = ['A sign that says "Hello World"', 'A shop window reading "OPEN LATE"']
    s = r(imgs, prompts)
    assert s.shape == (2,) and s.dtype == np.float32 and ((0 <= s) & (s <= 1)).all()
    rec = r.recognise(imgs)
    assert set(rec[0]) == ({"image", "lines"} if crops == "both" else {crops})
    # The reward is exactly the best Flow-GRPO similarity of what the (random) recogniser read.
    want = [max(ocr_similarity(t, q) for t in x.values()) for x, q in zip(rec, ["Hello World", "OPEN LATE"])]
    np.testing.assert_allclose(s, want, rtol=1e-6)
    assert r.info().range == (0.0, 1.0)
    with pytest.raises(ValueError, match="has no quoted text"):
        r(imgs[:1], ["a sign with no text"])


def test_hub_layout_loads_without_torchvision(tiny_trocr, tmp_path):
    """microsoft/trocr-* name ViTImageProcessor; without torchvision transformers must pick the PIL backend."""
    from test_rewards_geneval import hub_layout

    from raydiff.rewards.base import make_reward

    r = make_reward("ocr", model_path=hub_layout(tiny_trocr, tmp_path, "ViTImageProcessor"), crops="image",
                    max_new_tokens=4)
    assert type(r.processor.image_processor).__name__ == "ViTImageProcessorPil"
    assert r(render(["HI"])[None], ['"HI"']).shape == (1,)


def test_ocr_reward_tiny_path_and_bad_crops():
    from raydiff.rewards.base import make_reward

    r = make_reward("ocr", model_path="tiny://trocr", crops="image", max_new_tokens=4)
    assert r(render(["HI"])[None], ['"HI"']).shape == (1,)
    with pytest.raises(ValueError, match="ocr.crops 'words' must be image, lines or both"):
        make_reward("ocr", model_path="tiny://trocr", crops="words")
