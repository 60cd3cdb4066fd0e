"""ImageReward on transformers modules: the converter on a state dict with the published key names, checked
against a plain-torch forward written from those keys (BLIP ViT + BLIP's BERT with cross-attention + MLP)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydiff.rewards.base import make_reward

W, HEADS, LAYERS, PATCH, IMG = 32, 4, 2, 8, 32  # vision
TW, THEADS, TLAYERS, MAXPOS = 24, 4, 2, 40  # text (a width unlike the vision one: cross-attn k/v map 32 -> 24)


def _published_state_dict(vocab: int) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's key names (timm ViT in blip.visual_encoder, BLIP med BERT)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd, v = {}, "blip.visual_encoder."
    sd[v + "cls_token"] = r(1, 1, W, s=0.5)
    sd[v + "pos_embed"] = r(1, (IMG // PATCH) ** 2 + 1, W, s=0.5)
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = r(W, 3, PATCH, PATCH, s=0.2), r(W)
    for i in range(LAYERS):
        b = f"{v}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = 1 + r(W), r(W)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = r(3 * W, W, s=0.3), r(3 * W)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r(W, W, s=0.3), r(W)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = 1 + r(W), r(W)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = r(4 * W, W, s=0.3), r(4 * W)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = r(W, 4 * W, s=0.3), r(W)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = 1 + r(W), r(W)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = r(vocab, TW, s=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = r(MAXPOS, TW, s=0.5)
    sd[t + "embeddings.position_ids"] = torch.arange(MAXPOS)[None]
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = 1 + r(TW), r(TW)
    for i in range(TLAYERS):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", TW), ("crossattention", W)):
            sd[b + f"{att}.self.query.weight"], sd[b + f"{att}.self.query.bias"] = r(TW, TW, s=0.3), r(TW)
            for kv in ("key", "value"):
                sd[b + f"{att}.self.{kv}.weight"], sd[b + f"{att}.self.{kv}.bias"] = r(TW, kv_in, s=0.3), r(TW)
            sd[b + f"{att}.output.dense.weight"], sd[b + f"{att}.output.dense.bias"] = r(TW, TW, s=0.3), r(TW)
            sd[b + f"{att}.output.LayerNorm.weight"], sd[b + f"{att}.output.LayerNorm.bias"] = 1 + r(TW), r(TW)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = r(4 * TW, TW, s=0.3), r(4 * TW)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = r(TW, 4 * TW, s=0.3), r(TW)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + r(TW), r(TW)
    sd["blip.vision_proj.weight"], sd["blip.text_proj.weight"] = r(16, W), r(16, TW)  # unused by the score
    for i, (o, n) in {0: (1024, TW), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = r(o, n, s=0.2), r(o)
    return sd


def _mha(sd, p, x, ctx, heads, width, mask=None):
    n, L, _ = x.shape
    d = width // heads
    q = F.linear(x, sd[p + "query.weight"], sd[p + "query.bias"]).view(n, L, heads, d).transpose(1, 2)
    k = F.linear(ctx, sd[p + "key.weight"], sd[p + "key.bias"]).view(n, ctx.shape[1], heads, d).transpose(1, 2)
    v = F.linear(ctx, sd[p + "value.weight"], sd[p + "value.bias"]).view(n, ctx.shape[1], heads, d).transpose(1, 2)
    att = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        att = att.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(n, L, width)


def _ref_score(sd, pix, ids, mask):
    """ImageReward.score written out from the published keys: BLIP ViT (pre-LN, eps 1e-6), med BERT (post-LN)."""
    v = "blip.visual_encoder."
    x = F.conv2d(pix, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, W), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(LAYERS):
        b = f"{v}blocks.{i}."
        h = F.layer_norm(x, (W,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        n, L, _ = h.shape
        q, k, vv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(n, L, 3, HEADS, W // HEADS).permute(2, 0, 3, 1, 4)
        o = ((q @ k.transpose(-1, -2)) * (W // HEADS) ** -0.5).softmax(-1) @ vv
        x = x + F.linear(o.transpose(1, 2).reshape(n, L, W), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (W,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    img = F.layer_norm(x, (W,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)
    t = "blip.text_encoder."
    y = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = F.layer_norm(y, (TW,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], eps=1e-12)

    def ln(z, p):
        return F.layer_norm(z, (TW,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-12)

    for i in range(TLAYERS):
        b = f"{t}encoder.layer.{i}."
        for att, ctx, m in (("attention", None, mask.bool()), ("crossattention", img, None)):
            a = _mha(sd, b + f"{att}.self.", y, y if ctx is None else ctx, THEADS, TW, m)
            y = ln(F.linear(a, sd[b + f"{att}.output.dense.weight"], sd[b + f"{att}.output.dense.bias"]) + y, b + f"{att}.output.LayerNorm")
        h = F.gelu(F.linear(y, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        y = ln(F.linear(h, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"]) + y, b + "output.LayerNorm")
    z = y[:, 0]
    for i in (0, 2, 4, 6, 7):
        z = F.linear(z, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((z - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def test_converter_matches_published_forward(tmp_path):
    from raydiff.rewards.convert_imagereward import convert, main
    from raydiff.rewards.tiny_builders import tiny_bert_tokenizer

    tok_dir = tmp_path / "bert"
    tok = tiny_bert_tokenizer(tok_dir)
    sd = _published_state_dict(len(tok))
    torch.save(sd, tmp_path / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "vocab_size": len(tok), "hidden_size": TW, "num_hidden_layers": TLAYERS,
           "num_attention_heads": THEADS, "intermediate_size": 4 * TW, "max_position_embeddings": MAXPOS,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu", "add_cross_attention": True, "encoder_width": 768}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    assert main([str(tmp_path / "ImageReward.pt"), str(tmp_path / "med_config.json"), str(tmp_path / "ir"),
                 "--tokenizer", str(tok_dir), "--vision-heads", str(HEADS)]) == 0
    r = make_reward("imagereward", model_path=str(tmp_path / "ir"))
    assert r.input_size == IMG and r.max_length == 35
    imgs = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a cat", "the red apple!", "a blue car"]
    ids = r.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        want = _ref_score(sd, r.preprocess(imgs), ids["input_ids"], ids["attention_mask"])
        got = r.score_tensor(imgs, prompts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 1e-3  # the images and prompts matter
    # a tokenizer that does not fit the embedding table is a clear error
    torch.save(_published_state_dict(10), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"has 10 embedding rows"):
        convert(str(tmp_path / "small.pt"), str(tmp_path / "med_config.json"), str(tmp_path / "bad"),
                tokenizer=str(tok_dir), vision_heads=HEADS)


def test_tiny_imagereward_scores_and_gradients():
    r = make_reward("imagereward", model_path="tiny://imagereward")
    info = r.info()
    assert info.differentiable and info.version == "imagereward-v1.0" and info.input_size == 32
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    prompts = ["a photo of a cat", "a red car", "a photo of a cat"]
    s = r(imgs, prompts)
    assert s.shape == (3,) and s.dtype == np.float32 and np.isfinite(s).all()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    t = r.score_tensor(x, prompts)
    np.testing.assert_allclose(t.detach().numpy(), s, rtol=1e-5, atol=1e-5)
    t.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not np.isclose(s[0], r(imgs[:1], ["a blue dog"])[0])


def test_unconverted_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="convert_imagereward"):
        make_reward("imagereward", model_path=str(tmp_path))
