"""Reward service on Ray Serve: one batched deployment per reward behind a FastAPI ingress.

    HTTP client ──► proxy ──► RewardIngress (FastAPI: auth, limits, decode PNG/raw, fan-out)
                                   │ DeploymentHandle, numpy arrays (no base64 inside the cluster)
                                   ▼
          reward_<name> replicas: RewardWorker.score ──@serve.batch──► Reward(images, prompts)
    trainer (reward.backend=serve) ──► HandleRewards ──► the same reward_<name> handles

API (docs/rewards.md has status codes and curl examples; OpenAPI at /docs):
    GET  /healthz                    process up
    GET  /readyz                     every reward deployment answers (503 otherwise)
    GET  /v1/rewards                 catalogue
    POST /v1/rewards/{name}:score    one reward, per-item scores/errors
    POST /v1/score                   weighted mix of rewards, total + components

Invariants: a bad item never fails its request (per-item error), a bad request
never reaches a reward replica (422/413 in the ingress), and no exception from a
reward escapes `RewardWorker` (the replica stays up). Nothing is pickled on the
HTTP wire: images are PNG or raw uint8, base64 in JSON.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import io
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from raydiff.rewards.service_config import RewardDeploymentConfig, RewardServiceConfig, load_service_config

API_VERSION = "v1"


# ---------------------------------------------------------------------------------------------
# Reward replicas
# ---------------------------------------------------------------------------------------------


class RewardWorker:
    """One replica of one reward. `score` takes numpy images (N,H,W,3) uint8 (or a list of (H,W,3)) + prompts.

    Returns {"scores": float32 (N,) with NaN where errors[i] is set, "errors": [str|None]*N,
    "batch_size": images scored together with this request, "batched_requests": requests merged,
    "version": reward version}.
    """

    def __init__(self, cfg: dict, max_image_pixels: int = 4096 * 4096):
        from raydiff.rewards.base import make_reward

        self.cfg = RewardDeploymentConfig.model_validate(cfg)
        self.reward = make_reward(self.cfg.registry_name, **self.cfg.args)
        self.max_image_pixels = max_image_pixels
        self.score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def info(self) -> dict:
        i = self.reward.info()
        return {"name": self.cfg.name, "reward": i.name, "version": i.version, "differentiable": i.differentiable,
                "input_size": i.input_size, "range": list(i.range) if i.range else None, "weight": self.cfg.weight}

    async def score(self, images, prompts: list[str]) -> dict:
        return await self.score_batch((images, list(prompts)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # real values set in __init__ from the config
    async def score_batch(self, requests: list[tuple[Any, list[str]]]) -> list[dict]:
        return await asyncio.to_thread(self._score_requests, requests)

    def _score_requests(self, requests: list[tuple[Any, list[str]]]) -> list[dict]:
        # Flatten every request's items, validate each, group equal shapes, score groups in chunks.
        items: list[tuple[int, int, np.ndarray | None, str]] = []  # (request, index, image, prompt)
        results = []
        for r, (images, prompts) in enumerate(requests):
            n = len(images)
            results.append({"scores": np.full(n, np.nan, np.float32), "errors": [None] * n})
            if len(prompts) != n:
                results[r]["errors"] = [f"got {n} images but {len(prompts)} prompts"] * n
                continue
            for i in range(n):
                img, err = _check_item(images[i], self.max_image_pixels)
                if err:
                    results[r]["errors"][i] = err
                else:
                    items.append((r, i, img, str(prompts[i])))
        groups: dict[tuple, list] = {}
        for it in items:
            groups.setdefault(it[2].shape, []).append(it)
        chunk = self.cfg.max_images_per_forward
        for group in groups.values():
            for k in range(0, len(group), chunk):
                self._score_chunk(group[k : k + chunk], results)
        for res in results:
            res.update(batch_size=len(items), batched_requests=len(requests), version=self.reward.version)
        return results

    def _score_chunk(self, chunk: list, results: list[dict]) -> None:
        try:
            scores = self.reward(np.stack([it[2] for it in chunk]), [it[3] for it in chunk])
        except Exception as e:  # noqa: BLE001 - isolate the bad item(s): retry one by one
            if len(chunk) > 1:
                for it in chunk:
                    self._score_chunk([it], results)
                return
            scores, err = None, f"reward failed: {type(e).__name__}: {e}"[:500]
        for j, (r, i, _, _) in enumerate(chunk):
            if scores is None:
                results[r]["errors"][i] = err
            elif not math.isfinite(float(scores[j])):
                results[r]["errors"][i] = "reward returned a non-finite score"
            else:
                results[r]["scores"][i] = scores[j]


def _check_item(img, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    if isinstance(img, str):  # decoding error carried from the ingress
        return None, img
    a = np.asarray(img)
    if a.dtype != np.uint8:
        return None, f"image must be uint8, got {a.dtype}"
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        return None, f"image must have shape [H, W, 3], got {list(a.shape)}"
    if a.shape[0] * a.shape[1] > max_pixels:
        return None, f"image has {a.shape[0] * a.shape[1]} pixels, more than max_image_pixels={max_pixels}"
    return a, None


# ---------------------------------------------------------------------------------------------
# Wire format (HTTP only)
# ---------------------------------------------------------------------------------------------


class ImageItem(BaseModel):
    """One image: PNG bytes, or raw uint8 bytes in row-major (H, W, 3) order; base64 in `data`."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["png", "raw"] = Field("png", description="png (lossless, any size) or raw (uint8 HWC bytes).")
    data: str = Field(..., description="base64 (standard alphabet) of the PNG file or the raw bytes.")
    shape: list[int] | None = Field(None, description="[H, W, 3]; required for raw, checked for png when given.")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(..., description="One prompt per image.")
    images: list[ImageItem] = Field(..., description="Images to score, same order as prompts.")

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.prompts) != len(self.images):
            raise ValueError(f"prompts has {len(self.prompts)} entries but images has {len(self.images)}; "
                             "send one prompt per image")
        return self


class MixRequest(ScoreRequest):
    rewards: dict[str, float] | None = Field(
        None, description="{reward name: weight}; finite weights; default: every served reward at its configured weight."
    )

    @model_validator(mode="after")
    def _finite(self):
        for k, w in (self.rewards or {}).items():
            if not math.isfinite(w):
                raise ValueError(f"rewards.{k}: weight must be a finite number, got {w}")
        if self.rewards is not None and not self.rewards:
            raise ValueError("rewards is empty; name at least one reward or omit the field")
        return self


class ScoreResponse(BaseModel):
    scores: list[float | None]
    errors: list[str | None]
    model: str
    version: str
    batch_size: int = Field(description="Images scored in the same model batch (after @serve.batch merging).")
    batched_requests: int = Field(description="Requests @serve.batch merged with this one.")
    latency_ms: float


class MixResponse(BaseModel):
    total: list[float | None]
    errors: list[str | None]
    weights: dict[str, float]
    components: dict[str, ScoreResponse]
    latency_ms: float


def decode_item(item: ImageItem, max_pixels: int) -> np.ndarray | str:
    """Decode one image to uint8 (H, W, 3); on any problem return the error message instead."""
    try:
        raw = base64.b64decode(item.data, validate=True)
    except Exception:
        return "data is not valid base64"
    if item.format == "raw":
        shp = item.shape
        if shp is None or len(shp) != 3 or shp[2] != 3 or min(shp) < 1:
            return f"raw images need shape [H, W, 3] with H, W >= 1, got {shp}"
        if shp[0] * shp[1] > max_pixels:
            return f"image has {shp[0] * shp[1]} pixels, more than max_image_pixels={max_pixels}"
        need = shp[0] * shp[1] * 3
        if len(raw) != need:
            return f"raw data has {len(raw)} bytes but shape {shp} needs {need} (uint8, one byte per value)"
        return np.frombuffer(raw, np.uint8).reshape(shp)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                return f"expected a PNG (lossless), got {im.format or 'unknown format'}"
            if im.width * im.height > max_pixels:
                return f"image has {im.width * im.height} pixels, more than max_image_pixels={max_pixels}"
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Image.UnidentifiedImageError:
        return "undecodable PNG: data is not an image file"
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many types
        return f"undecodable PNG: {type(e).__name__}: {e}"[:300]
    if item.shape is not None and list(arr.shape) != list(item.shape):
        return f"decoded PNG has shape {list(arr.shape)} but shape says {item.shape}"
    return arr


class BodyLimit:
    """ASGI middleware: 413 once a request body passes the limit (Content-Length or streamed).

    The FastAPI app is module level (Serve needs it when the class is decorated), so the limit
    is a process global that RewardIngress.__init__ sets from the service config (one ingress
    per replica process).
    """

    max_bytes = 64 * 2**20

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > BodyLimit.max_bytes:
            return await self._reject(send, int(length))
        seen, rejected = 0, False

        async def limited_receive():
            # Past the limit: answer 413 ourselves and tell the app the client left. (Raising here
            # would be turned into a 400 by FastAPI's body parsing.)
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > BodyLimit.max_bytes:
                    rejected = True
                    await self._reject(send, seen)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not rejected:  # drop whatever the app answers after our 413
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send, size: int):
        resp = JSONResponse({"detail": f"request body is {size}+ bytes, over max_body_bytes={BodyLimit.max_bytes}"},
                            status_code=413)
        await resp({"type": "http"}, None, send)


def _validation_detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Ingress
# ---------------------------------------------------------------------------------------------

api = FastAPI(
    title="raydiff reward service",
    version=API_VERSION,
    description="Score images with the rewards raydiff trains against. See docs/rewards.md.",
)


class _Unavailable(Exception):
    def __init__(self, detail: str):
        self.detail = detail


class _TooManyImages(Exception):
    def __init__(self, n: int):
        self.n = n


# Everything the ingress uses must exist before @serve.ingress: Serve captures the app at decoration.
api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def _on_invalid(request: Request, err: RequestValidationError):
    return JSONResponse({"detail": _validation_detail(err), "errors": _jsonable_errors(err)}, status_code=422)


def _jsonable_errors(err: RequestValidationError) -> list[dict]:
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in err.errors()]


@serve.ingress(api)
class RewardIngress:
    """Auth, limits, decoding and fan-out; holds a handle per reward deployment."""

    def __init__(self, service: dict, token_sha256: str | None, handles: dict):
        self.cfg = RewardServiceConfig.model_validate(service)
        self.token_sha256 = token_sha256
        self.handles = handles  # {name: DeploymentHandle}
        BodyLimit.max_bytes = self.cfg.max_body_bytes
        self.inflight = 0
        self._info: dict[str, dict] = {}

    # -- helpers -------------------------------------------------------------------------------

    def _auth(self, request: Request) -> JSONResponse | None:
        if not self.token_sha256:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
            return JSONResponse({"detail": f"missing or wrong bearer token (set via {self.cfg.token_env})"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    def _busy(self, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(self.cfg.retry_after_s)})

    def _unknown(self, names) -> JSONResponse:
        return JSONResponse({"detail": f"unknown reward(s) {sorted(names)}; known rewards: {sorted(self.handles)}"},
                            status_code=404)

    async def _decode(self, req: ScoreRequest) -> list:
        if len(req.images) > self.cfg.max_images_per_request:
            raise _TooManyImages(len(req.images))
        mp = self.cfg.max_image_pixels
        return await asyncio.to_thread(lambda: [decode_item(it, mp) for it in req.images])

    async def _call(self, name: str, images: list, prompts: list[str]) -> dict:
        """Score the decodable items on reward `name`; decode errors stay per-item."""
        ok = [i for i, im in enumerate(images) if not isinstance(im, str)]
        errors = [im if isinstance(im, str) else None for im in images]
        scores = [None] * len(images)
        res = {"batch_size": 0, "batched_requests": 0}
        if ok:
            try:
                res = await self.handles[name].score.remote([images[i] for i in ok], [prompts[i] for i in ok])
            except serve.exceptions.BackPressureError:
                raise _Unavailable(f"reward {name!r} is overloaded (max_queued_requests reached); retry later")
            except Exception as e:  # noqa: BLE001 - replica died / restarting / unavailable
                raise _Unavailable(f"reward {name!r} is unavailable ({type(e).__name__}); retry later")
            for j, i in enumerate(ok):
                errors[i] = res["errors"][j]
                scores[i] = None if errors[i] else float(res["scores"][j])
        version = res.get("version") or (await self._reward_info(name))["version"]
        return {"scores": scores, "errors": errors, "model": name, "version": version,
                "batch_size": res["batch_size"], "batched_requests": res["batched_requests"]}

    async def _reward_info(self, name: str) -> dict:
        if name not in self._info:
            self._info[name] = await self.handles[name].info.remote()
        return self._info[name]

    async def _guard(self, request: Request, fn):
        """Auth, in-flight limit and error mapping shared by the scoring endpoints."""
        denied = self._auth(request)
        if denied:
            return denied
        if self.inflight >= self.cfg.max_inflight_requests:
            return self._busy(f"service busy ({self.inflight} requests in flight); retry later")
        self.inflight += 1
        t0 = time.perf_counter()
        try:
            out = await fn()
            if isinstance(out, JSONResponse):
                return out
            out["latency_ms"] = (time.perf_counter() - t0) * 1e3
            return out
        except _Unavailable as e:
            return self._busy(e.detail)
        except _TooManyImages as e:
            return JSONResponse({"detail": f"images: {e.n} images, over max_images_per_request="
                                           f"{self.cfg.max_images_per_request}"}, status_code=413)
        finally:
            self.inflight -= 1

    # -- endpoints -----------------------------------------------------------------------------

    @api.get("/healthz", summary="Process is up")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz", summary="Every reward deployment answers")
    async def readyz(self):
        try:
            infos = await asyncio.wait_for(asyncio.gather(*(self._reward_info(n) for n in self.handles)), 10)
        except Exception as e:  # noqa: BLE001
            return self._busy(f"not ready: {type(e).__name__}: {e}")
        return {"status": "ready", "rewards": [i["name"] for i in infos]}

    @api.get("/v1/rewards", summary="Catalogue of served rewards")
    async def catalogue(self, request: Request):
        denied = self._auth(request)
        if denied:
            return denied
        replicas = await asyncio.to_thread(self._replica_counts)
        out = []
        for name in self.handles:
            try:
                info = dict(await self._reward_info(name))
            except Exception as e:  # noqa: BLE001
                info = {"name": name, "error": f"{type(e).__name__}"}
            info["replicas"] = replicas.get(name)
            info["max_batch_size"] = self.cfg.reward(name).max_batch_size
            out.append(info)
        return {"rewards": out, "api_version": API_VERSION}

    def _replica_counts(self) -> dict[str, int | None]:
        try:
            app = serve.status().applications[self.cfg.app_name]
            return {r.name: int(app.deployments[r.deployment_name].replica_states.get("RUNNING", 0))
                    for r in self.cfg.rewards}
        except Exception:  # noqa: BLE001 - status is best effort
            return {}

    @api.post("/v1/rewards/{name}:score", response_model=ScoreResponse, summary="Score images with one reward",
              responses={401: {}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def score(self, name: str, body: ScoreRequest, request: Request):
        async def run():
            if name not in self.handles:
                return self._unknown([name])
            return await self._call(name, await self._decode(body), body.prompts)

        return await self._guard(request, run)

    @api.post("/v1/score", response_model=MixResponse, summary="Weighted mix of rewards",
              responses={401: {}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def score_mix(self, body: MixRequest, request: Request):
        async def run():
            weights = body.rewards or {r.name: r.weight for r in self.cfg.rewards}
            unknown = set(weights) - set(self.handles)
            if unknown:
                return self._unknown(unknown)
            images = await self._decode(body)
            parts = await asyncio.gather(*(self._call(n, images, body.prompts) for n in weights))
            comps = dict(zip(weights, parts))
            total, errors = [], []
            for i in range(len(images)):
                errs = [f"{n}: {c['errors'][i]}" for n, c in comps.items() if c["errors"][i]]
                errors.append("; ".join(errs) if errs else None)
                total.append(None if errs else float(sum(w * comps[n]["scores"][i] for n, w in weights.items())))
            return {"total": total, "errors": errors, "weights": weights,
                    "components": {n: {**c, "latency_ms": 0.0} for n, c in comps.items()}}

        return await self._guard(request, run)




# ---------------------------------------------------------------------------------------------
# Building and deploying
# ---------------------------------------------------------------------------------------------


def build_app(cfg: RewardServiceConfig) -> serve.Application:
    """A Serve application: `reward_<name>` deployments + the `ingress` deployment (route at cfg.route_prefix)."""
    handles = {}
    for r in cfg.rewards:
        opts: dict[str, Any] = dict(
            name=r.deployment_name,
            ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
            max_ongoing_requests=r.max_ongoing_requests,
            max_queued_requests=r.max_queued_requests,
        )
        if r.autoscaling_config is not None:
            opts["autoscaling_config"] = r.autoscaling_config.model_dump()
        else:
            opts["num_replicas"] = r.num_replicas
        handles[r.name] = serve.deployment(RewardWorker).options(**opts).bind(r.model_dump(), cfg.max_image_pixels)
    token = os.environ.get(cfg.token_env, "")
    # Only the digest travels to the controller, never the token itself.
    digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    ingress = serve.deployment(RewardIngress).options(
        name="ingress", num_replicas=cfg.ingress_num_replicas, ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        max_ongoing_requests=max(cfg.max_inflight_requests + 16, 100),
    )
    return ingress.bind(cfg.model_dump(), digest, handles)


def app_builder(args: dict) -> serve.Application:
    """`serve run raydiff.rewards.serve:app_builder config=configs/rewards.yaml` (other keys override fields)."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_app(load_service_config(path, **args))


def deploy(cfg: RewardServiceConfig, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy at cfg.host:cfg.port (if not running) and deploy the app; returns its URL."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
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
    ray.init(address=os.environ.get("RAY_ADDRESS") or None)
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


if __name__ == "__main__":
    sys.exit(main())
