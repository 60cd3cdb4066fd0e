"""Clients of the reward service.

`RewardClient`  HTTP (httpx) from anywhere: retries 502/503/504 and connection errors with
                exponential backoff (scoring is pure, so every call is safe to repeat).
`HandleRewards` inside the Ray cluster (trainer with `reward.backend: serve`): Serve deployment
                handles, numpy arrays instead of base64; same call as `WeightedRewards`.
`ensure_reward_service` deploys the trainer's rewards as a Serve app unless the same config runs already.
"""

from __future__ import annotations

import base64
import io
import os
import random
import socket
import time
from typing import Any, Iterable

import httpx
import numpy as np

from raydiff.rewards.base import check_groups, check_images

RETRY_STATUS = (502, 503, 504)


class RewardServiceError(RuntimeError):
    """The service answered with an error status (or a per-item error where none is allowed)."""

    def __init__(self, status: int | None, detail: str):
        super().__init__(f"reward service: {status or 'no response'}: {detail}")
        self.status, self.detail = status, detail


def encode_images(images, format: str = "raw") -> list[dict]:
    """uint8 (N, H, W, 3) (or a list of (H, W, 3)) -> JSON image items; PNG is lossless and smaller on the wire."""
    if format not in ("raw", "png"):
        raise ValueError(f"format must be 'raw' or 'png', got {format!r}")
    out = []
    for img in images:
        img = np.ascontiguousarray(img, dtype=np.uint8)
        if format == "raw":
            data = img.tobytes()
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)
            data = buf.getvalue()
        out.append({"format": format, "data": base64.b64encode(data).decode("ascii"), "shape": list(img.shape)})
    return out


def _to_array(values: list) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float32)


class RewardClient:
    """HTTP client of one reward service (base URL including the app's route prefix)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 0.25, max_backoff: float = 8.0, token_env: str = "RAYDIFF_REWARD_TOKEN"):
        token = token if token is not None else (os.environ.get(token_env) or None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url, self.max_retries, self.backoff, self.max_backoff = url.rstrip("/"), max_retries, backoff, max_backoff
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        self.retries = 0  # total retries made (for monitoring and tests)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, json: Any = None) -> dict:
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                r = self._http.request(method, path, json=json)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    return r.json()
                detail = _detail(r)
                if r.status_code not in RETRY_STATUS:
                    raise RewardServiceError(r.status_code, detail)
                last = f"{r.status_code}: {detail}"
                try:
                    retry_after = float(r.headers.get("retry-after", 0))
                except ValueError:
                    retry_after = 0.0
            if attempt == self.max_retries:
                break
            self.retries += 1
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
            time.sleep(max(delay, min(retry_after, self.max_backoff)))
        raise RewardServiceError(None, f"gave up after {self.max_retries + 1} attempts; last error {last}")

    # -- API -----------------------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def catalogue(self) -> list[dict]:
        return self._request("GET", "/v1/rewards")["rewards"]

    def score_response(self, name: str, images, prompts: list[str], format: str = "raw",
                       groups: list[list[int]] | None = None) -> dict:
        """The full JSON answer of POST /v1/rewards/{name}:score (`groups` for group-wise rewards)."""
        body = {"prompts": list(prompts), "images": encode_images(images, format)}
        if groups is not None:
            body["groups"] = [[int(i) for i in g] for g in groups]
        return self._request("POST", f"/v1/rewards/{name}:score", body)

    def score(self, name: str, images, prompts: list[str], format: str = "raw", allow_item_errors: bool = False,
              groups: list[list[int]] | None = None) -> np.ndarray:
        """float32 (N,); an item error raises unless allow_item_errors (then that score is NaN)."""
        res = self.score_response(name, images, prompts, format, groups)
        _raise_item_errors(name, res["errors"], allow_item_errors)
        return _to_array(res["scores"])

    def score_mix(self, weights: dict[str, float], images, prompts: list[str], format: str = "raw",
                  allow_item_errors: bool = False, groups: list[list[int]] | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total float32 (N,), {name: (N,)}) from POST /v1/score, like WeightedRewards."""
        body = {"rewards": dict(weights), "prompts": list(prompts), "images": encode_images(images, format)}
        if groups is not None:
            body["groups"] = [[int(i) for i in g] for g in groups]
        res = self._request("POST", "/v1/score", body)
        _raise_item_errors("mix", res["errors"], allow_item_errors)
        return _to_array(res["total"]), {n: _to_array(c["scores"]) for n, c in res["components"].items()}


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail"))
    except Exception:  # noqa: BLE001 - non-JSON error page
        return r.text[:300]


def _raise_item_errors(name: str, errors: list, allowed: bool) -> None:
    bad = [(i, e) for i, e in enumerate(errors) if e]
    if bad and not allowed:
        i, e = bad[0]
        raise RewardServiceError(200, f"{name}: {len(bad)} item(s) failed, first item {i}: {e}")


class HandleRewards:
    """In-cluster weighted reward over Serve handles; `(images (N,H,W,3) uint8, prompts) -> (total (N,), parts)`."""

    def __init__(self, app_name: str, components: list[tuple[str, float]], max_retries: int = 3):
        from ray import serve

        if not components:
            raise ValueError("HandleRewards needs at least one (reward_name, weight)")
        self.app_name, self.components, self.max_retries = app_name, [(n, float(w)) for n, w in components], max_retries
        self.handles = {n: serve.get_deployment_handle(f"reward_{n}", app_name) for n, _ in self.components}
        self.owned_app: str | None = None  # set by ensure_reward_service when it deployed the app

    def delete_owned_app(self) -> None:
        """Delete the Serve app ensure_reward_service deployed for this caller (no-op for a reused app).

        A failed delete is logged, not raised: the trainer calls this from `finally`."""
        from ray import serve

        if self.owned_app:
            app, self.owned_app = self.owned_app, None
            try:
                serve.delete(app)
            except Exception as e:  # noqa: BLE001 - called from `finally`: never mask the run's own error
                import logging

                logging.getLogger("raydiff.rewards").warning(
                    "could not delete Serve app %r (%s: %s); delete it with `serve delete %s`", app, type(e).__name__, e, app)

    def _send(self, name, images, prompts, groups=None):
        return self.handles[name].score.remote(images, prompts, groups)

    def _check(self, name: str, res: dict) -> np.ndarray:
        _raise_item_errors(name, res["errors"], False)
        return np.asarray(res["scores"], np.float32)

    def __call__(self, images: np.ndarray, prompts: list[str], groups: list[list[int]] | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images, prompts = check_images(images), list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        if groups is not None:
            groups = check_groups(groups, len(images))
        pending = {n: self._send(n, images, prompts, groups) for n, _ in self.components}  # all rewards in parallel
        parts = {}
        for n, resp in pending.items():
            for attempt in range(self.max_retries + 1):
                try:
                    parts[n] = self._check(n, resp.result())
                    break
                except RewardServiceError:
                    raise
                except Exception:  # noqa: BLE001 - replica died or restarting: resend
                    if attempt == self.max_retries:
                        raise
                    time.sleep(0.2 * 2**attempt)
                    resp = self._send(n, images, prompts, groups)
        return _total(self.components, parts), parts

    async def score_async(self, images: np.ndarray, prompts: list[str], groups: list[list[int]] | None = None
                          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The same, for callers inside an event loop (async actors), where `.result()` is not allowed."""
        import asyncio

        images, prompts = check_images(images), list(prompts)
        names = [n for n, _ in self.components]
        results = await asyncio.gather(*(self._send(n, images, prompts, groups) for n in names))
        parts = {n: self._check(n, r) for n, r in zip(names, results)}
        return _total(self.components, parts), parts


def _total(components, parts) -> np.ndarray:
    return np.asarray(sum(w * parts[n] for n, w in components), np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _component(c):
    """A RewardComponent from a component, a dict, or a (name, weight[, args]) tuple."""
    from raydiff.rewards.service_config import RewardComponent

    if isinstance(c, RewardComponent):
        return c
    if isinstance(c, dict):
        return RewardComponent.model_validate(c)
    if isinstance(c, (tuple, list)):
        return RewardComponent(name=c[0], weight=float(c[1]) if len(c) > 1 else 1.0, args=dict(c[2]) if len(c) > 2 else {})
    return RewardComponent.model_validate(c.model_dump() if hasattr(c, "model_dump") else vars(c))


def ensure_reward_service(components: Iterable, app_name: str = "raydiff-rewards", reuse: str = "error",
                          placement_check: bool = True) -> HandleRewards:
    """Handles to `app_name` on the connected cluster, deploying the components as that app if needed.

    `components`: RewardComponent objects (the trainer's reward.components), dicts of their fields,
    or (name, weight[, args]) tuples. A running app is used only if every component runs there with
    the same config hash (raydiff/rewards/serve/reuse.py); otherwise RewardAppMismatch, or with
    reuse="replace" it is deleted and redeployed; reuse="by_name" takes any running deployment of
    each named reward (raydiff eval, which names rewards without configuring them).
    `result.owned_app` is the app name when this call deployed it (the caller deletes it with
    `result.delete_owned_app()`), else None.
    """
    from ray import serve

    from raydiff.rewards.serve.app import build_app, check_placement
    from raydiff.rewards.serve.reuse import plan_components, serve_running
    from raydiff.rewards.service_config import RewardServiceConfig

    comps = [_component(c) for c in components]
    owned = None
    if plan_components(app_name, comps, reuse) == "deploy":
        if placement_check:  # fail at once, naming the field, if no node could hold a replica
            check_placement(comps, "reward.components")
        if not serve_running():
            # Handles need no HTTP; start one proxy on the head, localhost only, on a free port.
            serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, proxy_location="HeadOnly")
        cfg = RewardServiceConfig(app_name=app_name, route_prefix=f"/{app_name}", rewards=comps)
        serve.run(build_app(cfg), name=app_name, route_prefix=cfg.route_prefix)
        owned = app_name
    handles = HandleRewards(app_name, [(c.name, c.weight) for c in comps])
    handles.owned_app = owned
    return handles
