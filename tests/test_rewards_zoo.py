"""CLIP-family rewards on tiny random weights, loaded by path through the same code as real weights."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydiff.rewards.base import make_reward, reward_names
from raydiff.rewards.clip_rewards import AestheticHead, ClipPreprocess
from raydiff.models.tiny_clip import build_tiny_clip, resolve_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("zoo") / "tiny_clip")


def _args(name, tiny):
    if name == "aesthetic":
        return {"clip_path": tiny, "head_path": os.path.join(tiny, "aesthetic_head.pth")}
    return {"clip_path": tiny}


CLIP_REWARDS = ["aesthetic", "clip_score", "pickscore", "hps"]


def test_registry_has_the_zoo():
    assert set(CLIP_REWARDS + ["brightness", "jpeg_compressibility"]) <= set(reward_names())


@pytest.mark.parametrize("name", CLIP_REWARDS)
def test_reward_scores_and_gradients(name, tiny):
    r = make_reward(name, **_args(name, tiny))
    assert r.differentiable and r.info().input_size == 32
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    prompts = ["a photo of a cat", "a red car", "a photo of a cat"]
    s = r(imgs, prompts)
    assert s.shape == (3,) and s.dtype == np.float32 and np.isfinite(s).all()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    t = r.score_tensor(x, prompts)
    np.testing.assert_allclose(t.detach().numpy(), s, rtol=1e-5, atol=1e-5)  # uint8 path == tensor path
    t.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if name != "aesthetic":  # prompt matters for text-conditioned rewards
        assert not np.isclose(s[0], r(imgs[:1], ["a blue dog"])[0])


def test_tiny_path_resolution_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIFF_CACHE", str(tmp_path))
    root = resolve_path("tiny://clip")
    assert root == str(tmp_path / "tiny_clip") and os.path.isfile(os.path.join(root, "config.json"))
    mtime = os.path.getmtime(os.path.join(root, "model.safetensors"))
    assert resolve_path("tiny://clip") == root and os.path.getmtime(os.path.join(root, "model.safetensors")) == mtime
    assert resolve_path("tiny://clip/aesthetic_head.pth") == os.path.join(root, "aesthetic_head.pth")
    assert resolve_path("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    with pytest.raises(ValueError, match="tiny://clip"):
        resolve_path("tiny://unet")
    r = make_reward("clip_score", clip_path="tiny://clip")
    assert np.isfinite(r(np.zeros((1, 32, 32, 3), np.uint8), ["x"])).all()


def test_scorers_never_import_test_builders():
    """Production scorers, the service and the model loader import no tiny builder (tiny:// loads it on demand)."""
    import subprocess
    import sys

    code = ("import sys; from raydiff.rewards.base import make_reward, reward_names; reward_names(); "
            "import raydiff.rewards.serve, raydiff.rewards.client, raydiff.models.loader; "
            "print(sorted(m for m in sys.modules if m.startswith('raydiff.') and 'tiny' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tiny_build_is_deterministic(tiny, tmp_path):
    from safetensors.torch import load_file

    other = build_tiny_clip(tmp_path / "again")
    a, b = load_file(os.path.join(tiny, "model.safetensors")), load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_covers_all_bytes(tiny):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny)
    assert len(tok) > 512
    ids = tok("héllo ☃ wörld \x01 a photo of a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # nothing collapsed to unk (= <|endoftext|>)
    assert tok("a photo of a cat")["input_ids"] == [tok.bos_token_id] + [tok.convert_tokens_to_ids(t) for t in
                                                                         ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]] + [tok.eos_token_id]


@pytest.mark.parametrize("hw", [(48, 64), (64, 40), (20, 20), (32, 32)])
def test_preprocessing_matches_clip_image_processor(hw):
    from transformers import CLIPImageProcessorPil

    rng = np.random.default_rng(1)
    # Smooth images (upsampled noise): resampling kernels agree closely there, as on real photos.
    small = torch.from_numpy(rng.random((2, 3, 6, 6), dtype=np.float32))
    imgs = (F.interpolate(small, size=hw, mode="bilinear") * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ref = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = ref(images=list(imgs), return_tensors="pt")["pixel_values"]
    got = ClipPreprocess(32)(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    assert got.shape == want.shape == (2, 3, 32, 32)
    # Normalised units (std ~0.27): 0.03 ~ 2/255 in pixel terms; PIL rounds to uint8 after resizing.
    assert (got - want).abs().mean() < 0.03 and (got - want).abs().max() < 0.25


def _laion_head(sd, x):
    """The public predictor's forward, written out: Linear, Linear, Linear, Linear, Linear (dropout is identity)."""
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_loads_laion_head_layout(tiny, tmp_path, fmt):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    sd = {f"layers.{i}.{p}": torch.randn(shape if p == "weight" else shape[:1]) * 0.1
          for i, shape in {0: (1024, 16), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items()
          for p in ("weight", "bias")}
    assert set(sd) == set(AestheticHead(16).state_dict())  # same key names as sac+logos+ava1-l14-linearMSE.pth
    path = str(tmp_path / f"head.{fmt}")
    torch.save(sd, path) if fmt == "pth" else save_file(sd, path)
    r = make_reward("aesthetic", clip_path=tiny, head_path=path)
    imgs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        emb = r.model.get_image_features(pixel_values=r.preprocess(imgs)).pooler_output
        want = _laion_head(sd, emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        got = r.score_tensor(imgs, ["", ""])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_aesthetic_head_dim_mismatch_is_clear(tiny, tmp_path):
    path = str(tmp_path / "l14_head.pth")
    torch.save(AestheticHead(768).state_dict(), path)
    with pytest.raises(ValueError, match=r"expects 768-dim image embeds .* projects to 16"):
        make_reward("aesthetic", clip_path=tiny, head_path=path)
    with pytest.raises(ValueError, match="head_path is required"):
        make_reward("aesthetic", clip_path=tiny)


# ---- open_clip -> transformers conversion ---------------------------------------------------------

W, HEADS, LAYERS, PATCH, IMG, CTX, EMB = 32, 4, 2, 8, 32, 77, 16


def _open_clip_state_dict(vocab: int) -> dict[str, torch.Tensor]:
    """A random state dict with open_clip's ViT key names and shapes."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    sd = {}

    def blocks(prefix):
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = 1 + r(W), r(W)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * W, W, s=0.2), r(3 * W)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(W, W, s=0.2), r(W)
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = 1 + r(W), r(W)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * W, W, s=0.2), r(4 * W)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(W, 4 * W, s=0.2), r(W)

    grid = IMG // PATCH
    sd["visual.class_embedding"] = r(W, s=0.5)
    sd["visual.positional_embedding"] = r(grid * grid + 1, W, s=0.5)
    sd["visual.conv1.weight"] = r(W, 3, PATCH, PATCH, s=0.2)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = 1 + r(W), r(W)
    blocks("visual.")
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = 1 + r(W), r(W)
    sd["visual.proj"] = r(W, EMB, s=0.3)
    sd["token_embedding.weight"] = r(vocab, W, s=0.5)
    sd["positional_embedding"] = r(CTX, W, s=0.2)
    blocks("")
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + r(W), r(W)
    sd["text_projection"] = r(W, EMB, s=0.3)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)  # open_clip keeps this buffer; ignored
    return sd


def _ref_blocks(sd, prefix, x, mask=None):
    """open_clip's ResidualAttentionBlock stack written out (pre-LN, fused qkv, exact GELU)."""
    n, L, _ = x.shape
    d = W // HEADS
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}."
        h = F.layer_norm(x, (W,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (t.view(n, L, HEADS, d).transpose(1, 2) for t in
                   F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1))
        att = q @ k.transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            att = att + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, L, W)
        x = x + F.linear(o, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (W,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def _ref_image(sd, pix):
    x = F.conv2d(pix, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, W), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _ref_blocks(sd, "visual.", x)
    return F.layer_norm(x[:, 0], (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def _ref_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    x = _ref_blocks(sd, "", x, mask=torch.full((CTX, CTX), float("-inf")).triu(1))
    x = F.layer_norm(x, (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # pool at <|endoftext|>


def test_open_clip_conversion_round_trip(tiny, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from raydiff.rewards.convert_open_clip import convert

    tok = CLIPTokenizer.from_pretrained(tiny)
    sd = _open_clip_state_dict(len(tok))
    torch.save(sd, tmp_path / "open_clip.pt")
    out = convert(str(tmp_path / "open_clip.pt"), str(tmp_path / "hf"), tokenizer=tiny, vision_heads=HEADS,
                  text_heads=HEADS)
    model = CLIPModel.from_pretrained(out).eval()
    pix = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a cat", "the red apple ☃"]
    ids = tok(prompts, padding="max_length", max_length=CTX, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pix).pooler_output
        txt = model.get_text_features(**ids).pooler_output
        torch.testing.assert_close(img, _ref_image(sd, pix), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(txt, _ref_text(sd, ids["input_ids"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.logit_scale, sd["logit_scale"])
    # The converted folder is directly usable as the hps reward (tokenizer and preprocessor included).
    r = make_reward("hps", clip_path=out)
    imgs = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        a, b = _ref_image(sd, r.preprocess(imgs)), _ref_text(sd, ids["input_ids"])
        want = F.cosine_similarity(a, b, dim=-1)
        torch.testing.assert_close(r.score_tensor(imgs, prompts), want, rtol=1e-4, atol=1e-5)


# ---- service config ---------------------------------------------------------------------------


def test_service_config_example_and_errors():
    from raydiff.config_base import ConfigError, undocumented_fields
    from raydiff.rewards.service_config import RewardServiceConfig, load_service_config

    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    cfg = load_service_config(os.path.join(configs, "tiny_rewards.yaml"), port=9001)
    assert cfg.port == 9001 and cfg.reward("aesthetic").args["head_path"] == "tiny://clip/aesthetic_head.pth"
    assert cfg.reward("pickscore").autoscaling_config.max_replicas == 2
    # The cluster version: GPU rewards ask for GPUs and the reward node type's resource.
    gpu = load_service_config(os.path.join(configs, "rewards.yaml"))
    for name in ("aesthetic", "pickscore"):
        assert gpu.reward(name).num_gpus > 0 and set(gpu.reward(name).resources) == {"reward"}
    assert undocumented_fields(RewardServiceConfig) == []
    with pytest.raises(ConfigError, match=r"rewards\.0\.max_bathc_size: unknown key"):
        load_service_config(None, rewards=[{"name": "brightness", "max_bathc_size": 4}])
    with pytest.raises(ConfigError, match=r"rewards\.0.*max_ongoing_requests \(4\) < max_batch_size \(8\)"):
        load_service_config(None, rewards=[{"name": "brightness", "max_batch_size": 8, "max_ongoing_requests": 4}])
    with pytest.raises(ConfigError, match="duplicate names"):
        load_service_config(None, rewards=[{"name": "brightness"}, {"name": "brightness"}])
    with pytest.raises(ConfigError, match=r"rewards\.0\.name"):
        load_service_config(None, rewards=[{"name": "Bad Name"}])
