"""Build and deploy the reward service app; the `raydiff serve-rewards` entry point."""

import argparse
import hashlib
import os
import signal
import threading
import time
from typing import Any

from ray import serve

from raydiff.rewards.serve.ingress import RewardIngress
from raydiff.rewards.serve.replica import RewardWorker
from raydiff.rewards.serve.reuse import plan_app
from raydiff.rewards.service_config import RewardComponent, RewardServiceConfig, load_service_config


def reward_deployment(r: RewardComponent, max_image_pixels: int) -> serve.Application:
    """One `reward_<name>` deployment from its component: resources, replicas or autoscaling, batching.

    Its user_config carries the config hash (and the config, for readable mismatch errors) so a
    later deploy can tell whether the running deployment is the one it asks for (reuse.py)."""
    actor: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.resources:
        actor["resources"] = dict(r.resources)
    opts: dict[str, Any] = dict(
        name=r.deployment_name,
        ray_actor_options=actor,
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        user_config={"config_hash": r.deployment_hash(), "config": r.deployment_config()},
    )
    if r.autoscaling_config is not None:
        opts["autoscaling_config"] = r.autoscaling_config.model_dump()
    else:
        opts["num_replicas"] = r.num_replicas
    return serve.deployment(RewardWorker).options(**opts).bind(r.model_dump(), max_image_pixels)


def build_app(cfg: RewardServiceConfig) -> serve.Application:
    """A Serve application: `reward_<name>` deployments + the `ingress` deployment (route at cfg.route_prefix)."""
    handles = {r.name: reward_deployment(r, cfg.max_image_pixels) for r in cfg.rewards}
    digest = token_digest(cfg)
    ingress = serve.deployment(RewardIngress).options(
        name="ingress", num_replicas=cfg.ingress_num_replicas, ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        max_ongoing_requests=max(cfg.max_inflight_requests + 16, 100), user_config={"app_hash": app_hash(cfg)},
    )
    return ingress.bind(cfg.model_dump(), digest, handles)


def token_digest(cfg: RewardServiceConfig) -> str | None:
    """sha256 of the bearer token in $cfg.token_env (None: no auth). Only the digest travels to the controller."""
    token = os.environ.get(cfg.token_env, "")
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def app_hash(cfg: RewardServiceConfig) -> str:
    """The config hash plus the token digest: redeploying with another token is a different app."""
    return hashlib.sha256(f"{cfg.app_hash()}:{token_digest(cfg)}".encode()).hexdigest()[:16]


def check_placement(components: list[RewardComponent], field: str) -> None:
    """Fail at once, naming `field[i]` and the fix, when no node (type) could ever hold one replica.

    Without it a reward asking for GPUs or {reward: 1} on a cluster without such nodes leaves
    serve.run waiting forever."""
    from raydiff.engine.cluster.placement import check_feasible, role_bundles

    for i, c in enumerate(components):
        check_feasible(f"{field}[{i}]", role_bundles(c)[:1])


def app_builder(args: dict) -> serve.Application:
    """`serve run raydiff.rewards.serve:app_builder config=configs/rewards.yaml` (other keys override fields)."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_app(load_service_config(path, **args))


def _ray_address() -> str:
    """Join RAY_ADDRESS when set, else start a local cluster of our own (as the trainer's embedded
    mode): a bare ray.init() would join any `ray start` cluster whose address file it finds."""
    return os.environ.get("RAY_ADDRESS") or "local"


def deploy(cfg: RewardServiceConfig, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy at cfg.host:cfg.port (if not running) and deploy the app; returns its URL.

    An app named cfg.app_name that already runs the same config (app hash) is left as it is; one
    with another config is refused (RewardAppMismatch naming what differs) or, with
    cfg.reuse=replace, deleted and deployed anew."""
    import ray

    if not ray.is_initialized():
        ray.init(address=_ray_address())
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=cfg.proxy_location)
    if plan_app(cfg, app_hash(cfg)) == "reuse":
        return cfg.url()
    check_placement(cfg.rewards, "rewards")
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return cfg.url()


def main(argv: list[str] | None = None) -> int:
    """`raydiff serve-rewards [--config configs/rewards.yaml] [--host H] [--port P]`; stays up until Ctrl-C/SIGTERM."""
    import ray

    ap = argparse.ArgumentParser(prog="raydiff serve-rewards", description="Serve raydiff rewards over HTTP on Ray Serve.")
    ap.add_argument("--config", default=None, help="service YAML (see configs/rewards.yaml); default: brightness + jpeg")
    ap.add_argument("--host", default=None, help="bind address of the HTTP proxy (default from config: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default from config: 8000)")
    a = ap.parse_args(argv)
    cfg = load_service_config(a.config, host=a.host, port=a.port)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=_ray_address())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = deploy(cfg)
        token = " (bearer token required)" if os.environ.get(cfg.token_env) else ""
        print(f"raydiff reward service: {url}  (docs: {url}/docs){token}", flush=True)
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down reward service", flush=True)
        try:
            if joined:
                serve.delete(cfg.app_name)  # leave other apps on a shared cluster alone
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0

