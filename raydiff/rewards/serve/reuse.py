"""Reuse a running reward app only when it runs the config asked for; otherwise refuse or replace.

build_app writes a hash of each reward deployment's config into its Serve user_config
({config_hash, config}) and the whole app's hash into the ingress's ({app_hash}). Before
deploying, the caller reads them back from the Serve controller (the instance details that
`serve.status()` is built from) and compares:

    raydiff serve-rewards    the whole app: same app_hash -> leave it running; else refuse,
                             or delete and redeploy with `reuse: replace`
    trainer (backend=serve)  each reward it names: same config_hash -> use the running app
                             (it may serve more rewards); else refuse, or `reward.reuse: replace`

Before this check a running app was reused whenever deployment names matched, whatever its
models, weights or resources.
"""

from __future__ import annotations

import time
from typing import Iterable, Literal

from ray import serve

from raydiff.rewards.service_config import RewardComponent, RewardServiceConfig


class RewardAppMismatch(ValueError):
    """A Serve app of that name runs with another config, and reuse=error."""


def serve_running() -> bool:
    """True when a Serve controller runs on the connected cluster."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def app_details(app_name: str):
    """ray.serve.schema.ApplicationDetails of `app_name`, or None when Serve or the app is not running."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return ServeInstanceDetails(**client.get_serve_details()).applications.get(app_name)


def replica_nodes(app_name: str) -> dict[str, list[str]]:
    """{deployment: [node id of each RUNNING replica]}: where Serve placed the app's replicas."""
    app = app_details(app_name)
    if app is None:
        return {}
    return {name: [r.node_id for r in d.replicas if str(r.state.value) == "RUNNING"]
            for name, d in app.deployments.items()}


def _user_config(app, deployment: str) -> dict:
    d = app.deployments.get(deployment)
    return dict(d.deployment_config.user_config or {}) if d is not None else {}


def _live(app_name: str, wait_s: float = 120.0):
    """The running app, None if absent or failed (a failed app is deployed over); waits out a deletion."""
    deadline = time.monotonic() + wait_s
    while True:
        app = app_details(app_name)
        if app is None or app.status.value == "DEPLOY_FAILED":
            return None
        if app.status.value != "DELETING":
            return app
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve app {app_name!r} is still being deleted after {wait_s:.0f}s; retry later")
        time.sleep(0.5)


def component_problems(app, components: Iterable[RewardComponent]) -> list[str]:
    """What differs between the running app and these components (empty: every one runs as asked)."""
    problems = []
    for c in components:
        if c.deployment_name not in app.deployments:
            served = sorted(n.removeprefix("reward_") for n in app.deployments if n.startswith("reward_"))
            problems.append(f"reward {c.name!r} is not served (it serves {served})")
            continue
        uc = _user_config(app, c.deployment_name)
        if uc.get("config_hash") == c.deployment_hash():
            continue
        running, asked = uc.get("config") or {}, c.deployment_config()
        diffs = [f"{k}: running {running.get(k)!r}, asked {asked[k]!r}" for k in asked if running.get(k) != asked[k]]
        problems.append(f"reward {c.name!r} differs ({'; '.join(diffs) or 'config hash differs'})")
    return problems


def _refuse_or_delete(app_name: str, reuse: str, problems: list[str], field: str) -> None:
    if reuse != "replace":
        raise RewardAppMismatch(
            f"Serve app {app_name!r} already runs with another config: {' | '.join(problems)}. "
            f"Deploy under another app name, stop that app, or set {field}=replace to delete and redeploy it."
        )
    serve.delete(app_name)


def plan_app(cfg: RewardServiceConfig, app_hash: str) -> Literal["deploy", "reuse"]:
    """For `raydiff serve-rewards`: reuse an app with the same `app_hash` (app.py); refuse or delete a different one."""
    app = _live(cfg.app_name)
    if app is None:
        return "deploy"
    if _user_config(app, "ingress").get("app_hash") == app_hash:
        return "reuse"
    problems = component_problems(app, cfg.rewards)
    extra = sorted(set(app.deployments) - {r.deployment_name for r in cfg.rewards} - {"ingress"})
    if extra:
        problems.append(f"it also serves {extra}")
    _refuse_or_delete(cfg.app_name, cfg.reuse,
                      problems or ["service settings differ (limits, route, ingress or bearer token)"], "reuse")
    return "deploy"


def plan_components(app_name: str, components: list[RewardComponent],
                    reuse: str) -> Literal["deploy", "reuse"]:
    """For the trainer: reuse the app when every named reward runs with the same config hash.

    reuse="by_name" (raydiff eval, which names rewards without configuring them) only needs each
    reward to be served, whatever its config; a missing one is still an error."""
    app = _live(app_name)
    if app is None:
        return "deploy"
    problems = component_problems(app, components)
    if reuse == "by_name":
        problems = [p for p in problems if "is not served" in p]
    if not problems:
        return "reuse"
    if reuse == "by_name":
        raise RewardAppMismatch(f"Serve app {app_name!r} runs without some of these rewards: {' | '.join(problems)}. "
                                "Add them to its config or pick another app.")
    _refuse_or_delete(app_name, reuse, problems, "reward.reuse")
    return "deploy"
