"""Trainable weights: LoRA adapters (peft) or the full denoiser; export in formats plain diffusers loads.

Weight sync and checkpoints move only `trainable_state_dict` (LoRA: a few MB),
with a checksum so a receiver can verify before loading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def make_trainable(model, cfg) -> None:
    """Add LoRA adapters (kept in float32) or unfreeze the denoiser, per cfg.finetune."""
    net = model.denoiser
    if cfg.finetune == "lora":
        from peft import LoraConfig

        net.add_adapter(
            LoraConfig(
                r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                init_lora_weights="gaussian", target_modules=list(cfg.lora.target_modules),
            )
        )
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError(f"model.lora.target_modules={cfg.lora.target_modules} matched no {model.family.denoiser_folder} module")
    else:
        net.requires_grad_(True)
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()


def trainable_state_dict(net) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters that train (LoRA or all UNet weights)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in net.named_parameters() if p.requires_grad}


def load_trainable_state_dict(net, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the matching trainable parameters; names must match exactly."""
    params = dict(net.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"trainable weights do not match the model: {len(missing)} missing (e.g. {missing[:2]}), {len(unknown)} unknown (e.g. {unknown[:2]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


_CANONICAL = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and values in a canonical dtype, in name order.

    Half-precision floats (bf16, fp16) are hashed as the float32 they widen to exactly, so a
    DeepSpeed bf16 learner and an fp32 rollout worker holding the same values (the worker
    loaded the bf16 update) agree; equal iff the values are bit-identical after widening.
    A float32 CPU tensor is hashed in place (no copy); a half one is widened once.
    """
    h = hashlib.sha256()
    for n in sorted(state):
        t = state[n].detach()
        t = t.to("cpu", _CANONICAL.get(t.dtype, t.dtype)).contiguous()
        h.update(n.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)  # the buffer itself: no bytes() copy
    return h.hexdigest()


def export_weights(model, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> str:
    """Save LoRA so `pipe.load_lora_weights(out_dir)` works, or the full denoiser as a diffusers folder.

    The pipeline class and the LoRA key prefix (`unet.` / `transformer.`) come from the model's
    family. `state` (trainable weights by parameter name, e.g. gathered from ZeRO-3 shards) is
    used instead of the module's own parameters when given; the module is not modified.
    """
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family, net = model.family, model.denoiser
    folder = out / family.denoiser_folder
    if getattr(net, "peft_config", None):
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(net, state_dict=state) if state is not None else get_peft_model_state_dict(net)
        layers = {k: v.detach().cpu().float() for k, v in layers.items()}
        # Metadata keeps alpha != rank strengths right on reload (NOTES-diffusers.md).
        pipe_cls = getattr(diffusers, family.pipeline_class)
        pipe_cls.save_lora_weights(str(out), **family.lora_save_kwargs(layers, net.peft_config["default"].to_dict()))
    elif state is None:
        net.save_pretrained(str(folder))
    else:
        from safetensors.torch import save_file

        folder.mkdir(exist_ok=True)
        net.save_config(str(folder))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return str(out)
