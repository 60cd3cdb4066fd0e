"""Resource-aware placement: turn a role's config into Ray bundles, refuse what no node could
ever hold, and reserve the rest with a placement group that never hangs.

    bundles = role_bundles(cfg.rollout)            # [{"CPU": 1, "GPU": 1, "rollout": 1}] * N
    check_feasible("rollout", bundles)             # PlacementError at once if impossible
    pg = create_placement_group("rollout", bundles, strategy="SPREAD", timeout_s=600)

"Could ever" means: the nodes alive now, plus the node types the autoscaler may launch when
one runs. Pending placement groups are the demand the autoscaler scales on, so a feasible
request on an empty autoscaling cluster is normal: it waits (up to `timeout_s`) while nodes
boot. An infeasible one would wait forever, hence the check.

Where the autoscaler's node types come from, first found wins:
  1. `node_types=` passed by the caller (list of {"resources": {...}, "max_workers": n}),
  2. the cluster config the autoscaler reports to the GCS (autoscaler v2 / KubeRay),
  3. the file named by $RAYDIFF_AUTOSCALER_CONFIG,
  4. the `--autoscaling-config` of the monitor process of *this* cluster, when the driver
     runs on the head (`ray job submit`, `ray start --head --autoscaling-config ...`),
  5. ~/ray_bootstrap_config.yaml (what `ray up` writes on the head).
If an autoscaler runs but none of these can be read, only requests that are malformed are
refused at once; the placement-group timeout is then the backstop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import ray

from raydiff.engine.cluster.shapes import (
    _SIZE_KEYS,
    AUTOSCALER_CONFIG_ENV,
    NodeShape,
    cluster_shapes,
)

if TYPE_CHECKING:  # config.py imports the algorithm registry; placement only needs attributes.
    from raydiff.config import LearnerSection, RolloutSection

logger = logging.getLogger(__name__)

__all__ = [
    "PlacementError",
    "NodeShape",
    "role_bundles",
    "cluster_shapes",
    "check_feasible",
    "create_placement_group",
    "STRATEGIES",
]

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_EPS = 1e-9


class PlacementError(RuntimeError):
    """A role's resource ask cannot be placed; the message says what was asked, what the
    cluster offers, and what to change."""


# --------------------------------------------------------------------------- bundles


def role_bundles(section: Union["RolloutSection", "LearnerSection", Any]) -> list[dict[str, float]]:
    """One Ray resource dict per actor of a role.

    Reads `num_workers`, `num_cpus`, `resources`, and either `num_gpus` (rollout: GPUs per
    worker, may be fractional) or `use_gpu` (learner: one GPU per worker). Zero amounts are
    left out (Ray rejects zero-valued bundle entries).

    >>> role_bundles(types.SimpleNamespace(num_workers=2, num_cpus=1, num_gpus=1, resources={"rollout": 1}))
    [{'CPU': 1.0, 'GPU': 1.0, 'rollout': 1.0}, {'CPU': 1.0, 'GPU': 1.0, 'rollout': 1.0}]
    """
    num_workers = int(getattr(section, "num_workers", 1))
    if num_workers < 1:
        raise PlacementError(f"num_workers must be >= 1, got {num_workers}")
    gpus = getattr(section, "num_gpus", None)
    if gpus is None:
        gpus = 1.0 if getattr(section, "use_gpu", False) else 0.0
    bundle: dict[str, float] = {"CPU": float(getattr(section, "num_cpus", 1.0) or 0.0), "GPU": float(gpus)}
    for key, value in dict(getattr(section, "resources", None) or {}).items():
        if key in ("CPU", "GPU"):
            raise PlacementError(
                f"resources may not name {key!r}; use num_cpus / num_gpus (or use_gpu) instead"
            )
        bundle[str(key)] = float(value)
    bundle = {k: v for k, v in bundle.items() if v > 0}
    return [dict(bundle) for _ in range(num_workers)]


# --------------------------------------------------------------------------- feasibility


def _fits(bundle: dict[str, float], shape: NodeShape) -> bool:
    for key, amount in bundle.items():
        if key in _SIZE_KEYS and not shape.declares_sizes:
            continue
        if shape.resources.get(key, 0.0) + _EPS < amount:
            return False
    return True


def _sum(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _fmt_amount(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _fmt_res(resources: dict[str, float], sizes: bool = True) -> str:
    if not sizes:
        resources = {k: v for k, v in resources.items() if k not in _SIZE_KEYS}
    if not resources:
        return "{} (nothing)"
    return "{" + ", ".join(f"{k}: {_fmt_amount(v)}" for k, v in sorted(resources.items())) + "}"


def _fix_for(role: str, key: str, offered: float = 0.0) -> str:
    if key == "GPU":
        field = f"{role}.num_gpus" if role != "learner" else "learner.use_gpu=false"
        return (
            f"lower {field}, or add a node type with GPUs to the cluster config "
            "(available_node_types in cluster/aws.yaml or a KubeRay worker group with nvidia.com/gpu)"
        )
    if key == "CPU":
        return f"lower {role}.num_cpus, or add a node type with more CPUs"
    if key in _SIZE_KEYS:
        return f"ask for less {key}, or use a larger node type"
    if offered > 0:
        return (
            f"lower {role}.resources.{key} to at most {_fmt_amount(offered)}, or declare more {key} "
            "on a node type"
        )
    return (
        f"remove {key!r} from {role}.resources, or declare it on a node type "
        f"(cluster YAML `resources: {{{key}: 1}}`, KubeRay rayStartParams resources)"
    )


def _best_offer(shapes: list[NodeShape], key: str) -> Optional[NodeShape]:
    if not shapes:
        return None
    return max(shapes, key=lambda s: (s.resources.get(key, 0.0), s.resources.get("GPU", 0.0), s.resources.get("CPU", 0.0)))


def _describe_ask(role: str, bundle: dict[str, float], key: str, n: int, per: str) -> str:
    return (
        f"{role} asks {_fmt_amount(bundle.get(key, 0.0))} {key} per {per} "
        f"(bundle {_fmt_res(bundle)} x {n})"
    )


def _check(role: str, bundles: Sequence[dict[str, float]], strategy: str, alive, types, origin) -> None:
    shapes = list(alive) + list(types or [])
    where = f"{len(alive)} node(s) alive" + (
        f", node types the autoscaler may add: {', '.join(t.name for t in types) or 'none'}" if types is not None else ""
    )
    where += f"; source: {origin}"

    # 1. Every bundle must fit on some node (type). STRICT_PACK: all bundles on one node.
    units = [(_sum(bundles), "placement group (STRICT_PACK puts all workers on one node)")] if strategy == "STRICT_PACK" else [(b, "worker") for b in bundles]
    for bundle, per in units:
        if any(_fits(bundle, s) for s in shapes):
            continue
        # The resource that blocks: the first one no shape has enough of.
        blocking = next(
            (k for k in sorted(bundle, key=lambda k: (k not in ("GPU",), k)) if not any(_fits({k: bundle[k]}, s) for s in shapes)),
            None,
        )
        if blocking is None:  # each resource exists somewhere, but never together on one node
            blocking = max(bundle, key=lambda k: bundle[k])
            best = _best_offer(shapes, blocking)
            raise PlacementError(
                f"{role} asks {_fmt_res(bundle)} per {per}, but no single node offers all of it together; "
                f"the closest node ({best.name if best else '-'}) offers {_fmt_res(best.resources) if best else '{}'} "
                f"[{where}]. Fix: change {role}.num_cpus / num_gpus / resources to fit one node type, "
                "or add a node type that has all of them."
            )
        best = _best_offer(shapes, blocking)
        offer = (
            f"the largest node ({'type ' if best.launchable else ''}{best.name}) offers {_fmt_res(best.resources, sizes=blocking in _SIZE_KEYS)}"
            if best
            else "the cluster has no nodes"
        )
        raise PlacementError(
            f"{_describe_ask(role, bundle, blocking, len(bundles), per)}, but no node "
            f"{'or node type ' if types is not None else ''}can ever offer {_fmt_amount(bundle[blocking])} {blocking}: "
            f"{offer} [{where}]. Fix: {_fix_for(role, blocking, best.resources.get(blocking, 0.0) if best else 0.0)}."
        )

    # 2. The total must fit what all nodes together could offer (upper bound: alive nodes plus
    #    every node type at max_workers; only refused when surely too much).
    if types is not None and any(t.count is None for t in types):
        return
    total = _sum(bundles)
    for key, amount in total.items():
        if key in _SIZE_KEYS:
            continue
        capacity = sum(s.resources.get(key, 0.0) * (s.count or 0) for s in shapes)
        if capacity + _EPS < amount:
            raise PlacementError(
                f"{role} asks {_fmt_amount(amount)} {key} in total ({len(bundles)} workers x "
                f"{_fmt_amount(bundles[0].get(key, 0.0))}), but the cluster can offer at most "
                f"{_fmt_amount(capacity)} {key} [{where}]. Fix: lower {role}.num_workers, or add nodes / raise "
                f"max_workers of a node type that offers {key}."
            )
    if strategy == "STRICT_SPREAD":
        slots = sum((s.count or 0) for s in shapes if _fits(bundles[0], s))
        if slots < len(bundles):
            raise PlacementError(
                f"{role} asks {len(bundles)} workers on distinct nodes (STRICT_SPREAD), but at most {slots} "
                f"node(s) can hold one [{where}]. Fix: use strategy SPREAD, or raise max_workers."
            )


def _validate_bundles(role: str, bundles: Sequence[dict], strategy: str) -> list[dict[str, float]]:
    if strategy not in STRATEGIES:
        raise PlacementError(f"{role}: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not bundles:
        raise PlacementError(f"{role}: no bundles to place (num_workers must be >= 1)")
    out = []
    for i, b in enumerate(bundles):
        b = {str(k): float(v) for k, v in b.items()}
        bad = {k: v for k, v in b.items() if v < 0 or math.isnan(v)}
        if bad:
            raise PlacementError(f"{role}: bundle {i} has negative or NaN amounts {bad}")
        b = {k: v for k, v in b.items() if v > 0}
        if not b:
            raise PlacementError(
                f"{role}: worker {i} asks for no resources at all; a placement group bundle needs at "
                f"least one (set {role}.num_cpus > 0)"
            )
        out.append(b)
    return out


def _run_with_timeout(fn, timeout_s: float, what: str):
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydiff-placement")
    try:
        return pool.submit(fn).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise PlacementError(f"{what}: could not read the cluster state within {timeout_s:g}s (is the GCS reachable?)") from None
    finally:
        pool.shutdown(wait=False)


def check_feasible(
    role_name: str,
    bundles: Sequence[dict],
    timeout_s: float = 10.0,
    strategy: str = "PACK",
    node_types: Optional[Iterable[dict]] = None,
) -> None:
    """Raise PlacementError at once if no node (type) could ever hold these bundles.

    Compares against the nodes alive now plus, when an autoscaler runs, the node types it may
    launch (module docstring). Returns None when the request could be satisfied, now or after
    scale-up. `timeout_s` bounds reading the cluster state. Needs `ray.init()` first.
    """
    if not ray.is_initialized():
        raise PlacementError(f"{role_name}: ray.init() must be called before checking placement")
    bundles = _validate_bundles(role_name, bundles, strategy)
    node_types = list(node_types) if node_types is not None else None
    alive, types, origin = _run_with_timeout(lambda: cluster_shapes(node_types), timeout_s, role_name)
    if types is None and origin.startswith("autoscaler running"):
        # Node types unknown: we cannot prove infeasibility beyond nothing; let the placement
        # group's timeout decide, but say so once in the log.
        if not any(_fits(b, s) for b in bundles for s in alive):
            logger.warning(
                "%s: %s does not fit on any alive node; an autoscaler runs but its node types could not "
                "be read (set $%s to the cluster YAML to check at once). Waiting for scale-up.",
                role_name, _fmt_res(bundles[0]), AUTOSCALER_CONFIG_ENV,
            )
        return
    _check(role_name, bundles, strategy, alive, types, origin)


# --------------------------------------------------------------------------- placement groups


def create_placement_group(
    role: str,
    bundles: Sequence[dict],
    strategy: str = "PACK",
    timeout_s: float = 600.0,
    check: bool = True,
    name: Optional[str] = None,
):
    """Create a placement group for `role`, wait until it is placed, and return it.

    Waiting is what makes an autoscaler add nodes: the pending group is its demand. On
    timeout the group is removed (so it stops driving scale-up) and PlacementError is raised;
    this function never blocks longer than about `timeout_s` (+ the feasibility check).
    `check=True` first runs `check_feasible`, so impossible asks fail at once.
    """
    if not ray.is_initialized():
        raise PlacementError(f"{role}: ray.init() must be called before creating placement groups")
    bundles = _validate_bundles(role, bundles, strategy)
    if check:
        check_feasible(role, bundles, timeout_s=min(10.0, max(timeout_s, 1.0)), strategy=strategy)
    from ray.util.placement_group import placement_group, remove_placement_group

    pg_name = name or f"raydiff-{role}-{uuid.uuid4().hex[:8]}"
    pg = placement_group(bundles, strategy=strategy, name=pg_name)
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    except Exception:
        remove_placement_group(pg)
        raise
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"{role}: placement group of {len(bundles)} x {_fmt_res(bundles[0])} ({strategy}) was not placed "
            f"within {timeout_s:g}s and was removed. The cluster could hold it in principle, so nodes are "
            "busy or still booting (GPU nodes take minutes), the autoscaler hit max_workers or a cloud quota, "
            "or the instance type is out of capacity. Check `ray status` and the autoscaler log "
            "(/tmp/ray/session_latest/logs/monitor.*), then raise the timeout or lower the ask."
        )
    logger.info("%s: placement group %s ready (%d x %s, %s)", role, pg_name, len(bundles), _fmt_res(bundles[0]), strategy)
    return pg
