"""Random-weight SD1.5 / SDXL models of the REAL shapes, built offline (no hub), and their FLOPs.

UNet configs are those of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
(unet/config.json), written out; the VAE is the SD VAE (4 latent channels, 8× down). Text encoders are
skipped: prompt embeddings are random tensors of the real shape (77 × 768, SDXL 77 × 2048 + pooled 1280).
FLOPs per call from docs PERFORMANCE.md §2 (FlopCounterMode on the meta device).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
ARCH = {  # resolution, text dim, UNet TFLOP per call (batch 1), VAE decode TFLOP per image
    "sd15": dict(unet=SD15_UNET, resolution=512, text_dim=768, unet_tflop=0.803, vae_tflop=2.5, scaling=0.18215),
    "sdxl": dict(unet=SDXL_UNET, resolution=1024, text_dim=2048, unet_tflop=6.76, vae_tflop=10.5, scaling=0.13025),
}
# --dry-run shapes: the same code paths on CPU in seconds (2 down blocks, 32/64 channels, 32 px).
TINY_UNET = dict(
    sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
    block_out_channels=[32, 64], attention_head_dim=4, norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
TINY_XL_UNET = dict(TINY_UNET, cross_attention_dim=32, use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
                block_out_channels=[16, 32, 32, 32], norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
ARCH["sd15_tiny"] = dict(unet=TINY_UNET, vae=TINY_VAE, resolution=32, text_dim=32, pooled_dim=32, unet_tflop=0.803, vae_tflop=2.5, scaling=0.18215)
ARCH["sdxl_tiny"] = dict(unet=TINY_XL_UNET, vae=TINY_VAE, resolution=32, text_dim=32, pooled_dim=32, unet_tflop=6.76, vae_tflop=10.5, scaling=0.13025)
TINY = {"sd15": "sd15_tiny", "sdxl": "sdxl_tiny"}
ARCH_DIR = {"sd15": "sd15", "sdxl": "sdxl"}  # published configs in raydiff/models/architectures/
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "h800": 989.0, "a100": 312.0}


def gpu_flags(p: argparse.ArgumentParser, batch: int = 8, steps: int = 50) -> argparse.ArgumentParser:
    p.add_argument("--arch", choices=sorted(ARCH), default="sd15")
    p.add_argument("--resolution", type=int, default=None, help="default: 512 (sd15) / 1024 (sdxl)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak (default: from its name; H100 989 bf16)")
    p.add_argument("--device", default="cuda")
    return p


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    import torch

    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)


def unet_tflop(arch: str, resolution: int) -> float:
    """TFLOP of one UNet call at batch 1, scaled from the measured resolution by pixel count (conv/linear ∝ area)."""
    a = ARCH[arch]
    return a["unet_tflop"] * (resolution / a["resolution"]) ** 2


def build_model(arch: str, resolution: int | None, dtype: str, device: str, lora_rank: int | None = 4):
    """A raydiff DiffusionModel with random real-shape UNet + VAE (no text encoders), LoRA on the UNet."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from raydiff.models.loader import DiffusionModel

    a = ARCH[arch]
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    unet_cfg, vae_cfg = a["unet"], dict(a.get("vae", VAE), scaling_factor=a["scaling"])
    if arch in ARCH_DIR:  # the published configs, as raydiff plan uses them
        import json
        from pathlib import Path

        root = Path(__file__).resolve().parents[2] / "raydiff" / "models" / "architectures" / ARCH_DIR[arch]
        unet_cfg = json.loads((root / "unet" / "config.json").read_text())
        vae_cfg = json.loads((root / "vae" / "config.json").read_text())
    # Built directly on the device in the target dtype: no fp32 CPU copy (SDXL would be 10 GB of host RAM).
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config(vae_cfg)
    finally:
        torch.set_default_dtype(old)
    unet.to(device, dt)
    vae.to(device, dt)
    for m in (unet, vae):
        m.requires_grad_(False).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    res = resolution or a["resolution"]
    model = DiffusionModel(kind="sdxl" if "sdxl" in arch else "sd", denoiser=unet, vae=vae, text_encoders=[], tokenizers=[],
                           scheduler=sched, resolution=res, device=torch.device(device), dtype=dt, source=f"random:{arch}")
    if lora_rank:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
    return model


def random_cond(model, arch: str, n: int):
    import torch

    from raydiff.types import Conditioning

    a, dev, dt = ARCH[arch], model.device, model.dtype
    g = torch.Generator(dev).manual_seed(1)
    emb = torch.randn(n, 77, a["text_dim"], generator=g, device=dev, dtype=dt)
    neg = torch.randn(n, 77, a["text_dim"], generator=g, device=dev, dtype=dt)
    if "sdxl" not in arch:
        return Conditioning(emb, neg)
    r = model.resolution
    time_ids = torch.tensor([[r, r, 0, 0, r, r]] * n, device=dev, dtype=dt)
    pd = a.get("pooled_dim", 1280)
    pooled = torch.randn(n, pd, generator=g, device=dev, dtype=dt)  # seeded: two builds get the same conditioning
    return Conditioning(emb, neg, pooled, torch.randn(n, pd, generator=g, device=dev, dtype=dt), time_ids)


def require_gpu(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench/gpu scripts need a GPU (run with --help to see their flags)")
