"""Optimiser steppers: the learner's one interface to "apply this loss".

Algorithms call `stepper.backward(loss)` once per micro-step; the stepper scales
by 1/accumulation, and at each accumulation boundary clips, steps and zeroes.
`TorchStepper` is plain AdamW in one process; `raydiff.engine.learners.deepspeed_stepper`
implements the same interface over a DeepSpeed ZeRO engine across workers.
"""

from __future__ import annotations

import torch


def as_param_groups(params) -> list[dict]:
    """Accept a parameter list or optimiser groups [{'name', 'params', lr?, weight_decay?}]."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"name": "policy", "params": params}]


class TorchStepper:
    """AdamW with gradient accumulation and per-group clipping (each network clipped on its own), single process."""

    def __init__(self, params, learner_cfg, accumulation_steps: int = 1):
        groups = as_param_groups(params)
        if not groups[0]["params"]:
            raise ValueError("no trainable parameters: check model.finetune and model.lora.target_modules")
        self.groups = groups
        self.params = [p for g in groups for p in g["params"]]
        self.cfg = learner_cfg
        self.optimizer = torch.optim.AdamW(
            groups, lr=learner_cfg.learning_rate, betas=(learner_cfg.adam_beta1, learner_cfg.adam_beta2),
            eps=learner_cfg.adam_eps, weight_decay=learner_cfg.weight_decay,
        )
        self.accumulation_steps = accumulation_steps
        self.micro_step = 0
        self.global_step = 0
        self.last_grad_norm = 0.0
        self.group_grad_norms: dict[str, float] = {}

    def set_accumulation(self, steps: int) -> None:
        if self.micro_step % self.accumulation_steps:
            raise RuntimeError("cannot change accumulation in the middle of an accumulation window")
        self.accumulation_steps = max(1, steps)
        self.micro_step = 0

    def backward(self, loss: torch.Tensor, groups: list[str] | None = None) -> bool:
        """Accumulate grads of `loss`; returns True when this call made an optimiser step.

        `groups` (names, e.g. ["assistant"]) steps only those groups at this boundary,
        for alternating updates of several networks: the other groups' grads are
        dropped (set to None) before the step, and torch's AdamW skips params whose
        grad is None, so they do not move at all (no weight decay, no moment decay, no
        step count). Zeroing their grads instead would NOT freeze them: AdamW still
        applies weight decay and the running moments. None = every group. Their
        `group_grad_norms` entries keep the value of the last step that trained them.
        """
        (loss / self.accumulation_steps).backward()
        self.micro_step += 1
        if self.micro_step % self.accumulation_steps:
            return False
        names = [g.get("name", str(i)) for i, g in enumerate(self.groups)]
        if groups is not None:
            unknown = sorted(set(groups) - set(names))
            if unknown:
                raise ValueError(f"unknown optimiser groups {unknown}; groups are {names}")
        stepped = [i for i, n in enumerate(names) if groups is None or n in groups]
        for i, g in enumerate(self.groups):
            if i not in stepped:
                for p in g["params"]:
                    p.grad = None
        for i in stepped:
            self.group_grad_norms[names[i]] = float(torch.nn.utils.clip_grad_norm_(self.groups[i]["params"], self.cfg.max_grad_norm))
        if 0 in stepped:
            self.last_grad_norm = self.group_grad_norms[names[0]]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return True

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = state["global_step"]
