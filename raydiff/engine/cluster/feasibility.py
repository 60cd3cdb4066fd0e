"""Joint feasibility: do all roles of a run fit the cluster together, not just each alone?

`placement.check_feasible` refuses a role no node could ever hold. A run can still never start
when every role fits alone but not all at once (2 rollout + 2 learner workers of 1 CPU each on
a 2-CPU cluster): the rollout placement group takes the CPUs and Ray Train retries "worker group
startup timed out" forever. So before anything starts:

    demands = run_demands(cfg, is_async)      # {"learner": {"CPU": 2}, "rollout": {"CPU": 2}}
    check_run_fits(demands)                   # FeasibilityError naming each role and the total

Fixed-size cluster (no autoscaler): demand above the cluster's total resources fails at once.
Autoscaler whose node types are known: the bound is alive nodes + every type at max_workers.
Autoscaler with unknown node types: log what the run waits for; the roles' own start timeouts
(rollout.placement_timeout_s, learner.start_timeout_s) then give up. Reward deployments are not
counted (a served reward app may already run, its resources already taken).
"""

from __future__ import annotations

import logging

import ray

from raydiff.engine.cluster.placement import (
    PlacementError,
    _fmt_res,
    _sum,
    role_bundles,
)
from raydiff.engine.cluster.shapes import cluster_shapes

log = logging.getLogger("raydiff.feasibility")
_EPS = 1e-9


class FeasibilityError(PlacementError):
    """The roles together ask for more than the cluster could ever offer; names each role's demand."""


def run_demands(cfg, is_async: bool) -> dict[str, dict[str, float]]:
    """Total resources per role: {role: {resource: amount}} (the roles this run starts)."""
    demands = {"learner": _sum(role_bundles(cfg.learner))}
    if is_async:
        demands["rollout"] = _sum(role_bundles(cfg.rollout))
    return demands


def _capacity(shapes) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in shapes:
        for k, v in s.resources.items():
            total[k] = total.get(k, 0.0) + v * (s.count or 0)
    return total


def check_run_fits(demands: dict[str, dict[str, float]], node_types=None) -> dict[str, float]:
    """Raise FeasibilityError if the summed demand exceeds what the cluster could ever offer.

    Returns the capacity compared against (empty when it cannot be bounded: autoscaler with
    unknown or unbounded node types, which is logged with the demand it waits for).
    """
    if not ray.is_initialized():
        raise FeasibilityError("ray.init() must be called before checking the run's demand")
    alive, types, origin = cluster_shapes(node_types)
    total = _sum(list(demands.values()))
    described = "; ".join(f"{role} {_fmt_res(d)}" for role, d in demands.items())
    if types is None and origin.startswith("autoscaler running") or (types is not None and any(t.count is None for t in types)):
        log.warning("run needs %s in total (%s); the cluster has %s now and an autoscaler (%s) may add more: "
                    "waiting for it (bounded by rollout.placement_timeout_s and learner.start_timeout_s)",
                    _fmt_res(total), described, _fmt_res(_capacity(alive), sizes=False), origin)
        return {}
    capacity = _capacity(list(alive) + list(types or []))
    short = {k: v for k, v in total.items() if capacity.get(k, 0.0) + _EPS < v}
    if short:
        bound = "the cluster's total" if types is None else "the most the cluster and its autoscaler could offer"
        raise FeasibilityError(
            f"the run's roles together need {_fmt_res(total)} ({described}), but {bound} is "
            f"{_fmt_res(capacity, sizes=False)} ({len(alive)} node(s) alive; {origin}); short of "
            f"{', '.join(f'{k} by {v - capacity.get(k, 0.0):g}' for k, v in sorted(short.items()))}. Every role fits alone "
            "but not all at once, so the run would never start. Fix: lower rollout.num_workers / learner.num_workers "
            "or their num_cpus / num_gpus, or add nodes."
        )
    return capacity
