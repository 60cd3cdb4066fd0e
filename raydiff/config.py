"""The run config: one typed schema, defaults in one place, YAML and `key=value` only override.

`load_config("configs/tiny_ddpo.yaml", ["sampling.num_steps=4"])` returns a
validated `RunConfig` or raises `ConfigError` naming the field and the fix.
Sections that belong to one component (reward service, algorithm) are defined
next to that component and imported here.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from raydiff.algorithms.registry import AlgorithmConfig, default_algorithm_config
from raydiff.config_base import ConfigError, Section, apply_override, build, load_yaml, parse_override
from raydiff.rewards.service_config import RewardComponent  # one schema for trainer and reward service

__all__ = ["RunConfig", "ConfigError", "load_config"]


class LoraSection(Section):
    rank: int = Field(4, ge=1, description="LoRA rank r (ddpo-pytorch and DAG use 4).")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Denoiser module names that get LoRA adapters (attention projections by default; the same names in UNets and SD3/FLUX transformers).",
    )


class ModelSection(Section):
    path: str = Field("tiny://sd", description="Hub id, local diffusers folder, or tiny://sd | sdxl | sd3 | flux (random tiny model, built offline).")
    kind: Literal["auto", "sd", "sdxl", "sd3", "flux"] = Field("auto", description="Model family (models/family.py); auto reads it from model_index.json.")
    revision: Optional[str] = Field(None, description="Hub revision when `path` is a hub id.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights dtype for frozen parts; auto = float32 on CPU, bfloat16 on GPU. Log-probs are always float32.")
    resolution: Optional[int] = Field(None, ge=8, description="Image side in pixels; None = the model family's default (SD: unet.sample_size x VAE scale).")
    finetune: Literal["lora", "full"] = Field("lora", description="Train LoRA adapters (peft) or all weights of the denoiser (UNet or transformer).")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA shape, used when finetune=lora.")
    gradient_checkpointing: bool = Field(False, description="Recompute denoiser activations in backward to save memory.")
    attention: Literal["sdpa", "default"] = Field("sdpa", description="Attention kernel: PyTorch SDPA or diffusers' default processor.")
    compile: bool = Field(False, description="torch.compile the UNet forward of rollouts and learners (GPU: faster after a warm-up; CPU: usually slower).")
    channels_last: bool = Field(False, description="Keep UNet (and VAE) conv weights in channels_last memory format (faster convolutions on GPU).")


class SamplingSection(Section):
    num_steps: int = Field(50, ge=1, description="Denoising steps per training image (ddpo-pytorch: 50 DDIM; Flow-GRPO: 10 train vs 40 eval).")
    eval_num_steps: Optional[int] = Field(None, ge=1, description="Steps per image in evaluation (raydiff eval --config); None = num_steps. Flow-GRPO trains with fewer steps than it evaluates.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale; <= 1 disables the unconditional branch.")
    eta: float = Field(1.0, ge=0, description="DDIM eta (sd, sdxl); 1.0 makes every step Gaussian (required for log-probs, 0 gives NaN).")
    noise_level: float = Field(0.7, ge=0, description="Flow SDE noise level a (sd3, flux): σ_t = a·sqrt(σ/(1−σ)) (Flow-GRPO: 0.7); 0 = the deterministic Euler ODE.")
    sde_window_size: int = Field(0, ge=0, description="Flow models: stochastic (log-prob) steps per trajectory, the rest deterministic (Flow-GRPO-Fast / MixGRPO); 0 = every step.")
    sde_window_max_start: int = Field(0, ge=0, description="Flow models with sde_window_size > 0: the window starts at a step drawn uniformly from [0, this] per batch (seeded); 0 = always the first step.")
    batch_size: int = Field(8, ge=1, description="Images per rollout call per rollout worker.")
    negative_prompt: str = Field("", description="Prompt for the unconditional CFG branch.")


class PromptsSection(Section):
    source: str = Field("simple_animals", description="Packaged set name (simple_animals, activities, geneval, parti) or a .txt/.jsonl/.csv/.parquet path.")
    column: str = Field("prompt", description="Column holding the prompt in JSONL/CSV/Parquet files.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N prompts.")


class RewardSection(Section):
    backend: Literal["local", "serve"] = Field("local", description="Score in-process (local) or through Ray Serve deployment handles (serve).")
    components: list[RewardComponent] = Field(
        default_factory=lambda: [RewardComponent(name="brightness")],
        description="Rewards to mix; the training reward is the weighted sum.",
    )
    serve_app: str = Field("raydiff-rewards", description="Ray Serve application name used when backend=serve.")
    reuse: Literal["error", "replace"] = Field(
        "error",
        description="backend=serve and serve_app already runs: its deployments must match components (config hash); "
                    "else error, or replace = delete and redeploy it.",
    )


class RolloutSection(Section):
    num_workers: int = Field(1, ge=1, description="Number of RolloutWorker actors.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per rollout worker.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per rollout worker.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per rollout worker (e.g. {rollout: 1}) to pin it to a node type.")
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a crashed rollout worker; its lost batch is re-issued.")
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_PACK", "STRICT_SPREAD"] = Field("SPREAD", description="Placement group strategy for the rollout workers (SPREAD: across nodes when possible).")
    placement_timeout_s: float = Field(900.0, gt=0, description="How long to wait for the cluster (or autoscaler) to place the rollout workers before failing.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per rollout worker on CPU.")
    fuse_lora: bool = Field(True, description="Merge the LoRA into the rollout weights once per weight version (exactly reversible; same images within fp32/bf16 tolerance, faster).")
    decode_chunk: Optional[int] = Field(None, ge=1, description="Latents per VAE decode call (final images and DAG's x̂_0 rewards); None = from free GPU memory on GPU, 8 on CPU.")
    gpu_memory_gb: float = Field(80.0, gt=0, description="Memory of one GPU on rollout nodes; the memory plan (raydiff plan) refuses configs predicted to exceed it.")
    overlap_scoring: bool = Field(True, description="Score batch i while sampling batch i+1 on the same worker (false: wait for scores after every batch).")
    max_scoring_in_flight: int = Field(2, ge=1, description="With overlap_scoring: batches per rollout worker sampled and awaiting scores at once.")
    task_timeout_s: float = Field(1800.0, gt=0, description="Longest wait for one rollout batch (or weight update); past it the worker is restarted and the batch re-issued.")
    max_batch_retries: int = Field(3, ge=0, description="Times one rollout batch is re-issued after a failure (task error, lost worker or object, timeout) before the run stops.")


class LearnerSection(Section):
    engine: Literal["deepspeed", "torch"] = Field("deepspeed", description="deepspeed: Ray Train workers each stepping a DeepSpeed ZeRO engine; torch: one plain-AdamW learner actor (debugging).")
    num_workers: int = Field(1, ge=1, description="Data-parallel learner workers (Ray Train); engine=torch needs 1.")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts of the learner workers; they resume from the run's latest checkpoint.")
    use_gpu: bool = Field(False, description="One GPU per learner worker.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per learner worker.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per learner worker.")
    zero_stage: Literal[0, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (0 = plain data parallel).")
    deepspeed: dict = Field(default_factory=dict, description="Raw DeepSpeed JSON merged over the generated one.")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate (ddpo-pytorch: 3e-4).")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, description="AdamW epsilon.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per learner worker on CPU.")
    gpu_memory_gb: float = Field(80.0, gt=0, description="Memory of one GPU on learner nodes; the memory plan (raydiff plan) refuses configs predicted to exceed it.")
    task_timeout_s: float = Field(3600.0, gt=0, description="Longest wait for one learner task (a train step, publish, save); past it the run fails naming the learner.")
    start_timeout_s: float = Field(900.0, gt=0, description="Longest wait for all learner ranks to start (placed, restored); an autoscaler adding nodes gets this long.")


class TrainSection(Section):
    num_epochs: int = Field(100, ge=1, description="Sample-then-train rounds; each makes one new policy version.")
    batches_per_epoch: int = Field(1, ge=1, description="Rollout batches (of sampling.batch_size per worker) gathered per epoch.")
    seed: int = Field(0, description="Seed for prompts, noise and dropout; each rollout worker derives its own stream.")
    max_staleness: int = Field(0, ge=0, description="Max policy versions a batch may lag the learner; 0 = synchronous on-policy.")
    stale_policy: Literal["drop", "keep"] = Field("drop", description="Batches older than max_staleness: drop and re-sample, or keep with a damped weight.")
    stale_weight: float = Field(0.5, gt=0, le=1, description="With stale_policy=keep: weight per version beyond max_staleness.")
    verify_weights_every: int = Field(0, ge=0, description="Every N epochs check that all learner ranks and rollout workers hold bit-identical weights (0 = never; a mismatch stops the run).")


class OutputSection(Section):
    run_dir: str = Field("runs/${name}", description="Run directory; ${name} is replaced by `name`.")
    storage: Optional[str] = Field(None, description="Where every durable artefact goes, reachable from every node: a shared dir or a pyarrow.fs URI "
                                   "(s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http, gs://bucket/prefix); the run lives at STORAGE/<name>. "
                                   "None = run_dir on the driver's disk.")
    checkpoint_every: int = Field(10, ge=0, description="Save a checkpoint every N epochs (0 = only at the end).")
    resume: str = Field("never", description="never | auto (latest complete checkpoint in the run's storage) | a checkpoint path or URI.")
    image_grid_every: int = Field(1, ge=0, description="Write a grid of samples every N epochs (0 = never).")
    tensorboard: bool = Field(True, description="Write TensorBoard event files next to metrics.jsonl.")
    progress: bool = Field(True, description="Show progress bars.")
    experience_records: bool = Field(True, description="Write each trained sample's prompt, rewards, version, staleness and timings to experience/*.parquet.")
    record_tensors: bool = Field(False, description="Also store latents (fp16 bytes) and log-probs in the experience records (large).")


class RunConfig(Section):
    name: str = Field("raydiff", description="Run name, used in the run directory and logs.")
    model: ModelSection = Field(default_factory=ModelSection, description="Diffusion model to post-train.")
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="How rollouts sample images.")
    prompts: PromptsSection = Field(default_factory=PromptsSection, description="Training prompts.")
    reward: RewardSection = Field(default_factory=RewardSection, description="Reward mix and where it is scored.")
    algorithm: AlgorithmConfig = Field(default_factory=default_algorithm_config, description="Algorithm and its hyperparameters; `name` selects it.")
    rollout: RolloutSection = Field(default_factory=RolloutSection, description="Rollout actors.")
    learner: LearnerSection = Field(default_factory=LearnerSection, description="Learner workers and optimiser.")
    train: TrainSection = Field(default_factory=TrainSection, description="Training schedule.")
    output: OutputSection = Field(default_factory=OutputSection, description="Run directory, checkpoints, logging.")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join; None = RAY_ADDRESS or an embedded local cluster.")

    @model_validator(mode="after")
    def _algorithm_accepts_sampling(self) -> "RunConfig":
        """Cross-section check owned by the algorithm (e.g. log-prob algorithms need sampling.eta > 0)."""
        check = getattr(self.algorithm, "validate_sampling", None)
        if check is not None:
            check(self.sampling)
        return self

    @model_validator(mode="after")
    def _algorithm_accepts_model(self) -> "RunConfig":
        """An algorithm whose config declares `step_kinds` (e.g. DDIM-only) refuses other model families."""
        kinds = getattr(type(self.algorithm), "step_kinds", None)
        if not kinds:
            return self
        from raydiff.models.family import configured_family

        fam = configured_family(self.model)
        if fam is not None and fam.step_kind not in kinds:
            from raydiff.models.family import families

            fits = sorted(n for n, f in families().items() if f.step_kind in kinds)
            raise ConfigError(
                f"algorithm.name={self.algorithm.name!r} needs a model with {'/'.join(kinds)} steps (model.kind one of "
                f"{fits}), but model.path={self.model.path!r} (model.kind={self.model.kind!r}) is a {fam.name!r} model "
                f"with {fam.step_kind} steps; pick a model of those kinds, or an algorithm for {fam.step_kind} models")
        return self

    @property
    def run_dir(self) -> str:
        return self.output.run_dir.replace("${name}", self.name)


def load_config(path: Optional[str] = None, overrides: list[str] = ()) -> RunConfig:
    """Load YAML (optional), apply `key.sub=value` overrides, validate."""
    data = load_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return build(RunConfig, data)


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
