"""Memory plan: predicted peak GPU memory per role, from the model's real architecture, before anything starts.

Per role, resident bytes (weights, LoRA / optimiser state, kept trajectory tensors) plus the
largest transient phase (text encoding, one UNet call, one VAE decode chunk), plus overhead:

    peak = resident + max(phases) + 1 GiB (CUDA context, cuBLAS workspaces) + 10% of the phase (allocator slack)

Parameters are counted from the modules built on the meta device (architecture.py).
Activations are MEASURED, not modelled: the real forward (and backward, for learners) runs on
meta tensors under a tracker of live bytes (memory_trace.py), at batch 1 and 2, so each phase
is `fixed + per_unit x units` for the knob that scales it (sampling.batch_size,
algorithm.train_batch_size, rollout.decode_chunk). Optimiser state follows DeepSpeed bf16:
bf16 param + fp32 grad accumulator + fp32 master + Adam m, v = 18 bytes per trainable
parameter; ZeRO-1+ shards master and Adam over learner.num_workers, ZeRO-2 the grads, ZeRO-3
the params. Not counted: reward models scored in-process (reward.backend=local), algorithm
extras (DAG's flow net: a few M params), NCCL buffers.

`check_memory(cfg, needs)` raises MemoryPlanError naming the knob to turn when a GPU role's
peak exceeds `<role>.gpu_memory_gb`; `raydiff plan CONFIG` prints `format_plan`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from raydiff.engine.cluster.architecture import (
    UnknownArchitecture,
    architecture_folder,
    build_meta,
    lora_param_count,
    meta_modules,
    param_bytes,
    pick_dtype,
)
from raydiff.engine.cluster.memory_trace import traced_peak

log = logging.getLogger("raydiff.plan")
GiB = 2**30
OVERHEAD_BYTES = 1 * GiB
SLACK = 0.10
BYTES_PER_TRAINABLE = {"bf16": 2 + 4 + 4 + 8, "fp32": 4 + 4 + 8}  # param, grad, (master), Adam m+v
CPU_DECODE_CHUNK = 8  # latents per VAE call on CPU: small, memory is not the limit there
DECODE_ROOM_FRACTION = 0.5  # auto decode chunk uses half the free memory


class MemoryPlanError(RuntimeError):
    """A role's predicted peak GPU memory exceeds its `gpu_memory_gb`; the message names the knob."""


@dataclass
class Phase:
    """A transient peak: fixed + per_unit x units bytes, scaled by `knob` (a config field)."""

    name: str
    fixed: int
    per_unit: int
    units: int
    knob: str

    @property
    def bytes(self) -> int:
        return self.fixed + self.per_unit * self.units


@dataclass
class RoleEstimate:
    role: str
    budget_field: str
    budget_bytes: int
    resident: list = field(default_factory=list)  # (name, bytes, knob)
    phases: list = field(default_factory=list)  # Phase
    notes: list = field(default_factory=list)

    @property
    def peak_phase(self) -> Optional[Phase]:
        return max(self.phases, key=lambda p: p.bytes) if self.phases else None

    @property
    def total(self) -> int:
        phase = self.peak_phase.bytes if self.phases else 0
        return sum(b for _, b, _ in self.resident) + int(phase * (1 + SLACK)) + OVERHEAD_BYTES

    @property
    def fits(self) -> bool:
        return self.total <= self.budget_bytes

    def fix(self) -> str:
        """The knob to turn, with the largest value that fits when a phase is to blame."""
        resident = sum(b for _, b, _ in self.resident)
        room = (self.budget_bytes - resident - OVERHEAD_BYTES) / (1 + SLACK)
        over = [p for p in self.phases if p.bytes > room]
        if room > 0 and over:
            worst = max(over, key=lambda p: p.bytes)
            most = math.floor((room - worst.fixed) / worst.per_unit) if worst.per_unit else 0
            if most >= 1:
                return f"{worst.name} needs {worst.bytes / GiB:.1f} GiB; set {worst.knob} <= {most} (now {worst.units})"
            return f"{worst.name} needs {worst.bytes / GiB:.1f} GiB even at {worst.knob}=1; lower model.resolution"
        name, b, knob = max(self.resident, key=lambda r: r[1])
        return f"resident memory alone is {resident / GiB:.1f} GiB (largest: {name}, {b / GiB:.1f} GiB); turn {knob}"


# --------------------------------------------------------------------------- measured phases


def _unet_inputs(unet, rows: int, latent: int, dtype, grad: bool, seq: int):
    c = unet.config
    with torch.device("meta"):
        x = torch.empty(rows, c.in_channels, latent, latent, dtype=dtype, requires_grad=grad)
        kw = {"encoder_hidden_states": torch.empty(rows, seq, c.cross_attention_dim, dtype=dtype)}
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, pooled, dtype=dtype), "time_ids": torch.empty(rows, 6, dtype=dtype)}
        t = torch.full((rows,), 500, dtype=torch.long)
    return x, t, kw


@functools.lru_cache(maxsize=64)
def unet_peak(folder: str, dtype: torch.dtype, rows: int, latent: int, grad: bool, checkpointing: bool) -> int:
    """Peak activation bytes of one UNet call on `rows` latent rows (forward + backward when grad)."""
    meta = build_meta(folder, dtype)
    unet = meta.unet
    seq = meta.text_encoders[0].config.max_position_embeddings
    x, t, kw = _unet_inputs(unet, rows, latent, dtype, grad, seq)
    unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
    try:
        with torch.set_grad_enabled(grad):
            return traced_peak(lambda: unet(x, t, return_dict=False, **kw)[0], backward=grad)
    finally:
        unet.disable_gradient_checkpointing()


@functools.lru_cache(maxsize=64)
def vae_decode_peak(folder: str, dtype: torch.dtype, n: int, latent: int, grad: bool) -> int:
    vae = build_meta(folder, dtype).vae
    with torch.device("meta"):
        z = torch.empty(n, vae.config.latent_channels, latent, latent, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        return traced_peak(lambda: vae.decode(z, return_dict=False)[0], backward=grad)


@functools.lru_cache(maxsize=64)
def text_peak(folder: str, dtype: torch.dtype, rows: int) -> int:
    encoders = build_meta(folder, dtype).text_encoders
    peaks = []
    for enc in encoders:
        with torch.device("meta"):
            ids = torch.zeros(rows, enc.config.max_position_embeddings, dtype=torch.long)
        with torch.no_grad():
            peaks.append(traced_peak(lambda: enc(ids, output_hidden_states=True).last_hidden_state))
    return max(peaks)


def _linear(measure) -> tuple[int, int]:
    """(fixed, per_unit) from measurements at 1 and 2 units (activations are affine in the batch)."""
    one, two = measure(1), measure(2)
    per = max(two - one, 0)
    return max(one - per, 0), per


# --------------------------------------------------------------------------- roles


def _resolution(cfg, meta) -> int:
    return cfg.model.resolution or meta.default_resolution


def _cfg_rows(cfg) -> int:
    return 2 if cfg.sampling.guidance_scale > 1.0 else 1


def decode_items(cfg, needs) -> int:
    """Latents a rollout decodes per batch: the final images, plus x̂_0 at every step for intermediate rewards."""
    n = cfg.sampling.batch_size
    return n * (1 + cfg.sampling.num_steps) if needs is not None and needs.intermediate_rewards else n


def estimate_rollout(cfg, needs) -> RoleEstimate:
    dtype = pick_dtype(cfg.model.dtype)
    folder = str(architecture_folder(cfg.model.path))
    meta = build_meta(folder, dtype)
    res = _resolution(cfg, meta)
    latent = res // meta.vae_scale
    B, T, rows = cfg.sampling.batch_size, cfg.sampling.num_steps, _cfg_rows(cfg)
    share = min(1.0, cfg.rollout.num_gpus) if cfg.rollout.num_gpus > 0 else 1.0
    est = RoleEstimate("rollout", "rollout.gpu_memory_gb", int(cfg.rollout.gpu_memory_gb * share * GiB))
    weights = sum(param_bytes(m) for m in (meta.unet, meta.vae, *meta.text_encoders))
    est.resident.append((f"weights ({dtype_name(dtype)}: UNet, VAE, {len(meta.text_encoders)} text encoder(s))", weights, "model.dtype"))
    if cfg.model.finetune == "lora":
        lora = lora_param_count(meta.unet, cfg.model.lora.rank, cfg.model.lora.target_modules) * 4
        est.resident.append((f"LoRA r={cfg.model.lora.rank} (fp32)", lora, "model.lora.rank"))
    c = meta.unet.config.in_channels
    latent_bytes = c * latent * latent
    kept = B * (T + 1) * latent_bytes * torch.finfo(dtype).bits // 8
    kept += B * T * latent_bytes * 4 * sum(bool(getattr(needs, k, False)) for k in ("keep_eps", "intermediate_rewards", "keep_noise"))
    est.resident.append((f"trajectory tensors kept on device (N={B}, T={T})", kept, "sampling.batch_size"))
    f, p = _linear(lambda n: text_peak(folder, dtype, n * rows))
    est.phases.append(Phase("text encoders", f, p, B, "sampling.batch_size"))
    f, p = _linear(lambda n: unet_peak(folder, dtype, n * rows, latent, False, False))
    est.phases.append(Phase(f"UNet call ({rows} rows per image{' for CFG' if rows == 2 else ''}, {latent}x{latent} latents)", f, p, B, "sampling.batch_size"))
    f, p = _linear(lambda n: vae_decode_peak(folder, dtype, n, latent, False))
    items = decode_items(cfg, needs)
    chunk = cfg.rollout.decode_chunk
    if chunk is None:
        room = (est.budget_bytes - sum(b for _, b, _ in est.resident) - OVERHEAD_BYTES) / (1 + SLACK)
        chunk = auto_decode_chunk(room, f, p)
        est.notes.append(f"rollout.decode_chunk=auto: {chunk} on this budget (at run time: from the GPU's free memory)")
    est.phases.append(Phase(f"VAE decode ({res}x{res}, {min(chunk, items)} of {items} latents per call)", f, p, min(chunk, items), "rollout.decode_chunk"))
    if getattr(cfg.reward, "backend", "local") == "local":
        est.notes.append("reward.backend=local: reward models run on this worker and are not counted")
    return est


def auto_decode_chunk(room_bytes: float, fixed: int, per_image: int) -> int:
    """Latents per VAE call using half of `room_bytes` (the rest is headroom for fragmentation), at least 1."""
    if per_image <= 0:
        return CPU_DECODE_CHUNK
    return max(1, int((DECODE_ROOM_FRACTION * room_bytes - fixed) // per_image))


def vae_decode_cost(vae_config, dtype: torch.dtype, latent: int) -> tuple[int, int]:
    """(fixed, per image) peak bytes of decoding `latent`-sized latents with a VAE of this config (traced on meta)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config).to(dtype).eval()

    def measure(n):
        with torch.device("meta"):
            z = torch.empty(n, vae.config.latent_channels, latent, latent, dtype=dtype)
        with torch.no_grad():
            return traced_peak(lambda: vae.decode(z, return_dict=False)[0])

    return _linear(measure)


def runtime_decode_chunk(model, configured: Optional[int]) -> int:
    """The rollout's decode chunk: the configured one, else derived from the free memory of the model's GPU, else 8 (CPU).

    Called once the model is loaded, so free memory already excludes the weights; the VAE's
    per-image footprint is traced on a meta copy of the loaded VAE at the model's resolution.
    """
    if configured is not None:
        return configured
    if model.device.type != "cuda":
        return CPU_DECODE_CHUNK
    free, _ = torch.cuda.mem_get_info(model.device)
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    fixed, per = vae_decode_cost(model.vae.config, model.vae.dtype, model.latent_size)
    return auto_decode_chunk(free - OVERHEAD_BYTES, fixed, per)


def estimate_learner(cfg, needs) -> RoleEstimate:
    dtype = pick_dtype(cfg.model.dtype)
    folder = str(architecture_folder(cfg.model.path))
    meta = build_meta(folder, dtype)
    latent = _resolution(cfg, meta) // meta.vae_scale
    rows = _cfg_rows(cfg)
    est = RoleEstimate("learner", "learner.gpu_memory_gb", int(cfg.learner.gpu_memory_gb * GiB))
    W, zero = cfg.learner.num_workers, cfg.learner.zero_stage
    deepspeed = cfg.learner.engine == "deepspeed"
    if cfg.model.finetune == "lora":
        trainable = lora_param_count(meta.unet, cfg.model.lora.rank, cfg.model.lora.target_modules)
        frozen = sum(param_bytes(m) for m in (meta.unet, meta.vae, *meta.text_encoders))
    else:
        trainable = sum(p.numel() for p in meta.unet.parameters())
        frozen = sum(param_bytes(m) for m in (meta.vae, *meta.text_encoders))
    if needs is not None and needs.reference_model:
        frozen += param_bytes(meta.unet)
    est.resident.append((f"frozen weights ({dtype_name(dtype)})", frozen, "model.dtype"))
    if deepspeed:
        shard = lambda stage: W if zero >= stage else 1  # noqa: E731
        per = 2 / shard(3) + 4 / shard(2) + 12 / shard(1)
        what = f"DeepSpeed ZeRO-{zero} over {W} worker(s): bf16 param, fp32 grad, master, Adam"
    else:
        per, what = BYTES_PER_TRAINABLE["fp32"], "fp32 param, grad, Adam (engine=torch)"
    knob = "learner.zero_stage / learner.num_workers" if cfg.model.finetune == "full" else "model.lora.rank"
    est.resident.append((f"{trainable / 1e6:.1f}M trainable params ({cfg.model.finetune}; {what})", int(trainable * per), knob))
    ckpt = cfg.model.gradient_checkpointing
    tag = "gradient checkpointing" if ckpt else "no gradient checkpointing"
    if needs is None or needs.mode == "async":
        k = getattr(cfg.algorithm, "timesteps_per_forward", 1)  # steps scored per call: k× the rows
        f, p = _linear(lambda n: unet_peak(folder, dtype, n * rows * k, latent, True, ckpt))
        est.phases.append(Phase(f"UNet forward+backward ({tag}, {rows * k} rows per trajectory)", f, p,
                                getattr(cfg.algorithm, "train_batch_size", 1), "algorithm.train_batch_size"))
    else:
        B = cfg.sampling.batch_size
        per_call = getattr(cfg.algorithm, "checkpointing", True)
        calls = 1 if per_call else max(getattr(cfg.algorithm, "k_max", getattr(cfg.algorithm, "k", cfg.sampling.num_steps)), 1)
        f, p = _linear(lambda n: unet_peak(folder, dtype, n * rows, latent, True, ckpt))
        est.phases.append(Phase(f"UNet chain with gradients ({calls} call(s) live, {tag})", f * calls, p * calls, B, "sampling.batch_size"))
        f, p = _linear(lambda n: vae_decode_peak(folder, dtype, n, latent, True))
        est.phases.append(Phase("VAE decode with gradients", f, p, B, "sampling.batch_size"))
        est.notes.append("differentiable reward model on this worker is not counted")
    return est


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan(cfg, needs=None) -> list[RoleEstimate]:
    """Estimates for the roles this config starts: rollout (async algorithms) and learner."""
    if needs is None:
        from raydiff.algorithms.registry import make_algorithm

        needs = make_algorithm(cfg.algorithm, cfg.sampling).needs
    roles = [estimate_rollout(cfg, needs)] if needs.mode == "async" else []
    return roles + [estimate_learner(cfg, needs)]


def _uses_gpu(cfg, role: str) -> bool:
    return cfg.rollout.num_gpus > 0 if role == "rollout" else bool(cfg.learner.use_gpu)


def check_memory(cfg, needs=None) -> list[RoleEstimate]:
    """Raise MemoryPlanError if a GPU role's predicted peak exceeds its gpu_memory_gb; CPU roles are not checked."""
    if not (cfg.rollout.num_gpus > 0 or cfg.learner.use_gpu):
        return []
    try:
        estimates = plan(cfg, needs)
    except UnknownArchitecture as e:
        log.warning("memory plan skipped: %s", e)
        return []
    for est in estimates:
        if _uses_gpu(cfg, est.role) and not est.fits:
            raise MemoryPlanError(
                f"{est.role}: predicted peak GPU memory {est.total / GiB:.1f} GiB exceeds {est.budget_field}="
                f"{est.budget_bytes / GiB:g} GiB. Fix: {est.fix()}; or raise {est.budget_field} if the GPUs are larger. "
                f"Per-term table: `raydiff plan CONFIG`."
            )
    return estimates


def format_plan(cfg, estimates: list[RoleEstimate]) -> str:
    meta = meta_modules(cfg.model, pick_dtype(cfg.model.dtype))
    lines = [f"memory plan for {cfg.name}: {cfg.model.path} ({meta.kind}, architecture from {meta.source}), "
             f"{_resolution(cfg, meta)}px, dtype {dtype_name(pick_dtype(cfg.model.dtype))}"]
    for est in estimates:
        verdict = "fits" if est.fits else "DOES NOT FIT"
        lines.append(f"\n{est.role}: peak {est.total / GiB:.1f} GiB of {est.budget_bytes / GiB:g} GiB ({est.budget_field}) -> {verdict}")
        for name, b, knob in est.resident:
            lines.append(f"  resident  {b / GiB:8.2f} GiB  {name}  [{knob}]")
        peak = est.peak_phase
        for p in est.phases:
            mark = "*" if p is peak else " "
            lines.append(f"  phase{mark}    {p.bytes / GiB:8.2f} GiB  {p.name}: {p.fixed / GiB:.2f} + {p.per_unit / GiB:.3f} x {p.knob}={p.units}")
        lines.append(f"  overhead  {(est.total - sum(b for _, b, _ in est.resident) - (peak.bytes if peak else 0)) / GiB:8.2f} GiB  CUDA context 1 GiB + {SLACK:.0%} allocator slack on the peak phase")
        lines += [f"  note: {n}" for n in est.notes]
        if not est.fits:
            lines.append(f"  fix: {est.fix()}")
    lines.append("\n(* = the phase that sets the peak; phases run one after another, resident memory stays)")
    return "\n".join(lines)
