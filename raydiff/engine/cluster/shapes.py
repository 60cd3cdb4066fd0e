"""What the cluster offers: the shapes of the nodes alive now and of the node types an autoscaler
may launch (where those come from, first found wins, is listed in `cluster.placement`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import ray

logger = logging.getLogger("raydiff.engine.cluster.placement")

AUTOSCALER_CONFIG_ENV = "RAYDIFF_AUTOSCALER_CONFIG"
# Resources Ray adds per node that no request of ours names, and sizes that autoscaler
# configs usually leave out (unknown there = not a constraint).
_IGNORED_PREFIXES = ("node:", "accelerator_type:")
_SIZE_KEYS = ("memory", "object_store_memory")


@dataclass
class NodeShape:
    """What one node, or one launchable node type, offers."""

    name: str  # node id (alive node) or node type name (autoscaler)
    resources: dict[str, float]
    count: Optional[int] = 1  # nodes of this shape: 1 for alive nodes, max_workers for types; None = unbounded
    launchable: bool = False  # True = a node type the autoscaler may start
    declares_sizes: bool = field(default=True, repr=False)  # False: memory keys unknown


# --------------------------------------------------------------------------- cluster view


def _clean(resources: dict) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in resources.items()
        if not str(k).startswith(_IGNORED_PREFIXES) and float(v) > 0
    }


def _alive_node_shapes() -> list[NodeShape]:
    shapes = []
    for node in ray.nodes():
        if node.get("Alive") or node.get("alive"):
            shapes.append(NodeShape(name=node.get("NodeID", "?")[:12], resources=_clean(node.get("Resources", {}))))
    return shapes


def _autoscaler_running() -> bool:
    """True when an autoscaler that can add nodes (v1 monitor with a node provider, v2,
    KubeRay) reports to this cluster.

    A plain `ray.init()` / `ray start --head` cluster also runs a monitor, with a read-only
    provider that only mirrors the alive nodes (node types named `node_<node id>`): that
    cluster is fixed-size.
    """
    if _gcs_cluster_config() is not None:
        return True
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS (v1)
    except Exception:  # noqa: BLE001 - best effort, private API
        return False
    if raw is None:
        return False
    try:
        report = json.loads(raw).get("autoscaler_report") or {}
    except ValueError:
        return False
    mapping = report.get("node_type_mapping") or {}
    if not mapping:
        return bool(report.get("pending_launches") or report.get("pending_nodes"))
    read_only = all(node_type == f"node_{node_id}" for node_id, node_type in mapping.items())
    return not read_only


def _gcs_cluster_config():
    try:
        return ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - private API; absent in some versions
        return None


def _shapes_from_gcs() -> Optional[list[NodeShape]]:
    config = _gcs_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    shapes = []
    for group in config.node_group_configs:
        if group.max_count == 0:
            continue
        shapes.append(
            NodeShape(
                name=group.name,
                resources=_clean(dict(group.resources)),
                count=None if group.max_count < 0 else int(group.max_count),
                launchable=True,
                declares_sizes=any(k in group.resources for k in _SIZE_KEYS),
            )
        )
    return shapes


def _shapes_from_autoscaler_config(config: dict) -> list[NodeShape]:
    """Node types of a cluster-launcher config (cluster/aws.yaml shape), head excluded."""
    head = config.get("head_node_type")
    global_max = config.get("max_workers")
    shapes = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        max_workers = node_type.get("max_workers", global_max)
        if max_workers is not None and global_max is not None:
            max_workers = min(int(max_workers), int(global_max))
        if max_workers == 0:
            continue
        resources = dict(node_type.get("resources") or {})
        shapes.append(
            NodeShape(
                name=name,
                resources=_clean(resources),
                count=None if max_workers is None else int(max_workers),
                launchable=True,
                declares_sizes=any(k in resources for k in _SIZE_KEYS),
            )
        )
    return shapes


def _load_config_file(path: str) -> Optional[dict]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError:
        import yaml

        return yaml.safe_load(text)


def _local_monitor_config_path() -> Optional[str]:
    """`--autoscaling-config` of the autoscaler monitor of *this* cluster, if it runs here.

    Matched on the GCS address so that another cluster on the same machine is never read.
    """
    try:
        gcs_address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001
        return None
    if not gcs_address or not os.path.isdir("/proc"):
        return None
    port = gcs_address.rsplit(":", 1)[-1]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") or a.endswith("autoscaler/v2/monitor.py") for a in args):
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in args):
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                return a.split("=", 1)[1]
    return None


def _autoscaler_shapes() -> tuple[Optional[list[NodeShape]], str]:
    """(node types the autoscaler may launch, where they came from); (None, why) if unknown."""
    shapes = _shapes_from_gcs()
    if shapes is not None:
        return shapes, "autoscaler cluster config in the GCS"
    candidates = [
        (os.environ.get(AUTOSCALER_CONFIG_ENV), f"${AUTOSCALER_CONFIG_ENV}"),
        (_local_monitor_config_path(), "the autoscaler monitor's --autoscaling-config"),
        ("~/ray_bootstrap_config.yaml", "~/ray_bootstrap_config.yaml"),
    ]
    running = None
    for path, origin in candidates:
        if not path:
            continue
        if path.startswith("~/ray_bootstrap") and not (running := _autoscaler_running()):
            continue  # a stale file on a machine whose cluster has no autoscaler
        config = _load_config_file(path)
        if config is not None:
            return _shapes_from_autoscaler_config(config), f"{origin} ({os.path.expanduser(path)})"
    if running is None:
        running = _autoscaler_running()
    return None, ("autoscaler running, node types unknown" if running else "fixed-size cluster (no autoscaler)")


def cluster_shapes(node_types: Optional[Iterable[dict]] = None) -> tuple[list[NodeShape], Optional[list[NodeShape]], str]:
    """(alive nodes, launchable node types or None if unknown, description of the source)."""
    alive = _alive_node_shapes()
    if node_types is not None:
        types = [
            NodeShape(
                name=str(t.get("name", f"type{i}")),
                resources=_clean(dict(t.get("resources", {}))),
                count=t.get("max_workers"),
                launchable=True,
                declares_sizes=any(k in t.get("resources", {}) for k in _SIZE_KEYS),
            )
            for i, t in enumerate(node_types)
        ]
        return alive, types, "node_types given by the caller"
    types, origin = _autoscaler_shapes()
    return alive, types, origin
