"""DeepSpeed ZeRO (stage 0/2/3) stepper with the same interface as `TorchStepper`.

One `DeepSpeedStepper` lives in each data-parallel learner process (a Ray Train
worker). Every rank calls every method in the same order: `backward` at an
accumulation boundary, `save_checkpoint`, `load_checkpoint` and (ZeRO-3)
`gathered_trainable_state` are collectives.

Ranks and shards (world size W, ZeRO-3)::

    rank r:  full module object, every param partitioned 1/W (frozen base too)
             forward: pre-hooks all-gather each submodule's params, then free
             optimizer: AdamW over its 1/W slice of the *trainable* params only
    boundary step: grads reduce-scattered (averaged over W) -> each rank
             updates its slice -> params re-gathered on the next forward

Caveats:
- ZeRO-3 partitions the frozen base weights too, and every forward (each
  sampler step for sync algorithms) all-gathers them layer by layer. With LoRA
  the optimizer state is tiny, so ZeRO-2 is usually the better choice; ZeRO-3
  pays off for finetune=full. Params below `stage3_param_persistence_threshold`
  (default 1e5 elements) stay whole on every rank.
- bf16 (GPU): DeepSpeed casts every module param, LoRA included, to bf16 and
  keeps fp32 masters in the optimizer; inputs must be bf16 (or autocast) and
  `gathered_trainable_state` returns bf16 tensors. CPU runs are fp32 throughout.
- The frozen params must be floating point of the training dtype: DeepSpeed
  checks the whole module (fp32 when bf16 is off).

Running on CPU (tests: 2 workers, gloo, fp32) -- what DeepSpeed 0.19 needs:

- Accelerator: auto-detected as "cpu" when torch sees no CUDA device (log line
  "Setting accelerator to CPU"); `DS_ACCELERATOR=cpu` forces it but is not needed.
  The CPU accelerator only imports `oneccl_bindings_for_pytorch` if installed;
  without it its backend is gloo. intel_extension_for_pytorch is not needed.
- Process group: we reuse the one Ray Train made (gloo on CPU, NCCL on GPU):
  `deepspeed.init_distributed` wraps an initialised torch.distributed group
  instead of creating one. Outside Ray Train it creates one from the usual
  RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT variables.
- Compiled ops: on CPU `init_distributed` JIT-builds `deepspeed_shm_comm`
  (~50-80 s on 2 cores, cached in ~/.cache/torch_extensions). Training never
  uses it (only `inference_all_reduce` does), so `_skip_cpu_shm_comm_op` marks it
  incompatible before init and nothing is compiled. To warm it instead (install
  step): `python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder;
  ShareMemCommBuilder().load()"`.
- Optimizer: config `optimizer.params.torch_adam: true` makes DeepSpeed build
  `torch.optim.AdamW` (foreach), so neither FusedAdam (a JIT C++/CUDA op) nor
  DeepSpeedCPUAdam (JIT, used with optimizer offload) is ever built. Overrides
  can turn it off (`deepspeed: {optimizer: {params: {torch_adam: false}}}`); the
  install step must then warm `FusedAdamBuilder().load()` / `CPUAdamBuilder().load()`.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in recursively (override wins on leaves)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(learner_cfg, accumulation_steps: int, use_gpu: bool) -> dict:
    """DeepSpeed JSON from a `LearnerSection`, with `learner_cfg.deepspeed` deep-merged on top.

    Micro batch is 1 "sample" per `backward` call: DeepSpeed's batch sizes only
    drive its accumulation counter and logging, the algorithm picks the real
    batch. train_batch_size = 1 x accumulation x world size (DeepSpeed fills it).
    """
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(max(1, accumulation_steps)),
        # 0: DeepSpeed would clip all groups by one global norm; DeepSpeedStepper clips each
        # optimiser group (LoRA, DAG's flow net, ...) by its own norm instead (see _GroupClipper).
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": int(learner_cfg.zero_stage)},
        "bf16": {"enabled": bool(use_gpu)},  # fp32 on CPU: gloo + CPU kernels, bit-exact tests
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learner_cfg.learning_rate,
                "betas": [learner_cfg.adam_beta1, learner_cfg.adam_beta2],
                "eps": learner_cfg.adam_eps,
                "weight_decay": learner_cfg.weight_decay,
                # torch.optim.AdamW: no JIT-compiled FusedAdam / CPUAdam op (module docstring).
                "torch_adam": True,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # no DeepSpeed progress lines; raydiff logs metrics itself
        "wall_clock_breakdown": False,
    }
    out = deep_merge(cfg, dict(learner_cfg.deepspeed or {}))
    if out.get("gradient_clipping", 0.0):
        raise ValueError("learner.deepspeed.gradient_clipping: raydiff clips each optimiser group by learner.max_grad_norm "
                         "itself; set learner.max_grad_norm instead")
    return out


def _inner_torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (inside its ZeRO / bf16 wrappers)."""
    opt = optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class _GroupClipper:
    """Step pre-hook on DeepSpeed's inner torch optimizer: per-group clipping and frozen groups.

    Runs after DeepSpeed has reduced (and, under ZeRO, partitioned) the gradients and
    right before the inner AdamW updates. ZeRO-1/2 step one group at a time
    (`param_groups` = [that group]); ZeRO-3 one sub-group at a time (the others' `params`
    emptied); bf16/stage 0 all at once. Groups are recognised by identity. For each
    group with gradients:
    - frozen (not in `backward(groups=...)`): grads set to None, so torch's AdamW skips
      those params entirely: no moment decay, no step count, no weight decay;
    - else its norm: local squared norm, summed over ranks when the grads are partitions
      (any DeepSpeed wrapper), and the grads scaled to `max_norm` as clip_grad_norm_ does.
    Every rank calls the hook for the same groups in the same order, so the all-reduce
    is a matched collective.
    """

    def __init__(self, inner: torch.optim.Optimizer, names: list[str], max_norm: float, partitioned: bool):
        self.names = {id(g): n for g, n in zip(inner.param_groups, names)}
        self.max_norm, self.partitioned = max_norm, partitioned
        self.frozen: set[str] = set()
        self.norms: dict[str, float] = {}
        inner.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        import torch.distributed as dist

        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            name = self.names.get(id(group))
            if not grads or name is None:
                continue
            if name in self.frozen:
                for p in group["params"]:
                    p.grad = None
                continue
            sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
            if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sq)
            norm = float(sq.sqrt())
            self.norms[name] = norm
            coef = self.max_norm / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)


def _skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling `deepspeed_shm_comm` on CPU (training does not use it).

    `deepspeed.comm.torch.build_shm_op` builds it only when
    `deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]` is true; that dict is
    module state, so setting the entry once per process is enough. No-op on GPU
    (the CUDA accelerator has no such builder) and if already built (JIT cache hit
    would be cheap, but the op is still unused).
    """
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # layout changed in a later DeepSpeed: fall back to building it
        pass


def init_distributed(use_gpu: bool) -> None:
    """Wrap (or create) the torch.distributed process group for DeepSpeed; idempotent."""
    import deepspeed

    if not use_gpu:
        _skip_cpu_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


class DeepSpeedStepper:
    """`TorchStepper`'s interface over a DeepSpeed engine; build one per rank, in the same order.

    `module` is the whole UNet (frozen base + LoRA). It is what DeepSpeed wraps:
    under ZeRO-3 all of its params (frozen ones too) are partitioned and gathered
    by forward hooks, so calling `module(...)` or `self.engine(...)` both work.
    `params` are the trainable ones; only they enter the optimizer.
    Rank 0's initial values win: DeepSpeed broadcasts them at initialize.
    """

    def __init__(self, module: torch.nn.Module, params: list[torch.nn.Parameter], learner_cfg,
                 accumulation_steps: int = 1, use_gpu: bool = False):
        import deepspeed

        from raydiff.engine.learners.optim import as_param_groups

        groups = as_param_groups(params)
        if not groups[0]["params"]:
            raise ValueError("no trainable parameters: check model.finetune and model.lora.target_modules")
        # DeepSpeed takes torch-style groups; our `name` key is ours alone.
        ds_groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
        params = [p for g in groups for p in g["params"]]
        init_distributed(use_gpu)
        self.cfg = learner_cfg
        self.use_gpu = use_gpu
        self.module = module
        self._trainable_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.accumulation_steps = max(1, int(accumulation_steps))
        self.micro_step = 0  # backward calls in the current accumulation window
        self.last_grad_norm = 0.0
        config = deepspeed_config(learner_cfg, self.accumulation_steps, use_gpu)
        self.zero_stage = int(config["zero_optimization"]["stage"])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=ds_groups, config=config)
        self.params = params
        self.group_names = [g.get("name", str(i)) for i, g in enumerate(groups)]  # order of optimizer.param_groups
        inner = _inner_torch_optimizer(self.optimizer)
        if self.zero_stage == 3 and len(getattr(self.optimizer, "fp32_partitioned_groups_flat", groups)) != len(groups):
            raise ValueError("ZeRO-3 split an optimiser group into several sub-groups, so per-group clipping would clip "
                             "each piece alone: raise learner.deepspeed.zero_optimization.sub_group_size")
        self.clipper = _GroupClipper(inner, self.group_names, float(learner_cfg.max_grad_norm),
                                     partitioned=inner is not self.optimizer)
        self.group_grad_norms = self.clipper.norms  # name -> norm at the last step that trained the group

    # -- stepping ---------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def rank(self) -> int:
        return int(self.engine.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.engine.world_size)

    def set_accumulation(self, steps: int) -> None:
        """Change micro-steps per optimiser step; only between windows, as in TorchStepper.

        DeepSpeed fixes gradient_accumulation_steps at initialize, but
        `set_train_batch_size` rewrites it (it only sets the 1/gas loss scale and
        the boundary counter). The boundary itself we set explicitly each micro-step
        (see `backward`), so DeepSpeed's own micro-step counter, which is not
        reset here, does not matter. No engine rebuild is needed.
        """
        if self.micro_step:
            raise RuntimeError("cannot change accumulation in the middle of an accumulation window")
        self.accumulation_steps = max(1, int(steps))
        self.engine.set_train_batch_size(self.engine.train_micro_batch_size_per_gpu() * self.accumulation_steps * self.engine.dp_world_size)

    def backward(self, loss: torch.Tensor, groups: Optional[list[str]] = None) -> bool:
        """engine.backward (loss scaled by 1/accumulation) + engine.step; True when the weights changed.

        `groups` (names) steps only those optimiser groups at this boundary, as in
        TorchStepper: `_GroupClipper` drops the other groups' (zero-filled) grads right
        before AdamW, which then skips them: weights, Adam moments and step counts of the
        idle groups stay exactly as they were. Each stepped group is clipped by its own norm.

        Invariant: every rank calls backward the same number of times with the
        same accumulation, because the boundary call all-reduces (ZeRO-0/1),
        reduce-scatters (ZeRO-2/3) gradients averaged over ranks and steps.
        Non-boundary calls only accumulate locally; engine.step() is then a no-op.
        """
        boundary = self.micro_step + 1 >= self.accumulation_steps
        # Set before backward: ZeRO-2/3 reduction hooks read it during backward.
        self.engine.set_gradient_accumulation_boundary(boundary)
        before = self.engine.global_steps
        self.engine.backward(loss)
        if groups is not None and boundary:
            unknown = sorted(set(groups) - set(self.group_names))
            if unknown:
                raise ValueError(f"unknown optimiser groups {unknown}; groups are {self.group_names}")
            self.clipper.frozen = set(self.group_names) - set(groups)
        try:
            self.engine.step()
        finally:
            self.clipper.frozen = set()
        self.micro_step = 0 if boundary else self.micro_step + 1
        stepped = self.engine.global_steps > before
        if stepped and self.group_names[0] in self.group_grad_norms:
            self.last_grad_norm = self.group_grad_norms[self.group_names[0]]
        return stepped

    # -- weights ----------------------------------------------------------------------------
    def gathered_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full CPU copies of the trainable params, named as `lora.trainable_state_dict(unet)`.

        Collective under ZeRO-3 (all ranks must call it, in the same order); the
        result is returned on EVERY rank. ZeRO-0/2 keep full params on each rank,
        so no communication happens there.
        """
        import deepspeed

        named = dict(self.module.named_parameters())
        params = [named[n] for n in self._trainable_names]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            return {n: p.detach().to("cpu", copy=True) for n, p in zip(self._trainable_names, params)}

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: Optional[dict] = None) -> str:
        """Collective: each rank writes its optimizer shard into `save_dir/tag` (shared or merged later).

        Frozen base weights are left out (they come from model.path on load);
        DeepSpeed writes `save_dir/latest` on rank 0.
        """
        if self.micro_step:
            raise RuntimeError("cannot checkpoint in the middle of an accumulation window")
        state = {"raydiff_accumulation_steps": self.accumulation_steps, **(client_state or {})}
        os.makedirs(save_dir, exist_ok=True)
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=state, exclude_frozen_parameters=True)
        return os.path.join(save_dir, tag)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None) -> dict:
        """Collective: restore weights, optimizer and global_step; returns the client_state saved with it."""
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {load_dir!r} (tag {tag!r})")
        client_state = dict(client_state or {})
        steps = client_state.pop("raydiff_accumulation_steps", self.accumulation_steps)
        self.micro_step = 0
        if steps != self.accumulation_steps:
            self.set_accumulation(steps)
        return client_state

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed state is sharded per rank: use save_checkpoint(dir, tag) on every rank")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed state is sharded per rank: use load_checkpoint(dir, tag) on every rank")
