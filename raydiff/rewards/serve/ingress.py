"""FastAPI ingress of the reward service: auth, limits, decoding and fan-out to reward handles.

Invariant: a bad request never reaches a reward replica (401/404/413/422 answered here);
an overloaded or restarting reward becomes 503 + Retry-After, never a 500.
"""

import asyncio
import hashlib
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from raydiff.rewards.serve.body_limit import BodyLimit
from raydiff.rewards.serve.schema import MixRequest, MixResponse, ScoreRequest, ScoreResponse, decode_item
from raydiff.rewards.service_config import RewardServiceConfig

API_VERSION = "v1"


def _validation_detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)



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
        self.app_hash: str | None = None

    def reconfigure(self, user_config: dict) -> None:
        """Serve hands over the ingress's user_config: {app_hash} written by build_app (reuse.py reads it)."""
        self.app_hash = (user_config or {}).get("app_hash", self.app_hash)

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

    async def _call(self, name: str, images: list, prompts: list[str], groups: list[list[int]] | None = None) -> dict:
        """Score the decodable items on reward `name`; decode errors stay per-item (and leave their group)."""
        ok = [i for i, im in enumerate(images) if not isinstance(im, str)]
        errors = [im if isinstance(im, str) else None for im in images]
        scores = [None] * len(images)
        res = {"batch_size": 0, "batched_requests": 0}
        if ok:
            if groups is not None:  # re-index onto the decodable items
                pos = {i: j for j, i in enumerate(ok)}
                groups = [g for g in ([pos[i] for i in grp if i in pos] for grp in groups) if g]
            try:
                res = await self.handles[name].score.remote([images[i] for i in ok], [prompts[i] for i in ok], groups)
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
            return await self._call(name, await self._decode(body), body.prompts, body.groups)

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
            parts = await asyncio.gather(*(self._call(n, images, body.prompts, body.groups) for n in weights))
            comps = dict(zip(weights, parts))
            total, errors = [], []
            for i in range(len(images)):
                errs = [f"{n}: {c['errors'][i]}" for n, c in comps.items() if c["errors"][i]]
                errors.append("; ".join(errs) if errs else None)
                total.append(None if errs else float(sum(w * comps[n]["scores"][i] for n, w in weights.items())))
            return {"total": total, "errors": errors, "weights": weights,
                    "components": {n: {**c, "latency_ms": 0.0} for n, c in comps.items()}}

        return await self._guard(request, run)

