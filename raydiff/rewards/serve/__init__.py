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

One concern per module:
    replica.py     RewardWorker, the @serve.batch deployment class
    schema.py      request/response schemas and image decoding (wire format)
    body_limit.py  ASGI middleware: 413 past max_body_bytes
    ingress.py     the FastAPI ingress deployment
    app.py         build_app / app_builder / deploy / main (`raydiff serve-rewards`)

Invariants: a bad item never fails its request (per-item error), a bad request
never reaches a reward replica (422/413 in the ingress), and no exception from a
reward escapes `RewardWorker` (the replica stays up). Nothing is pickled on the
HTTP wire: images are PNG or raw uint8, base64 in JSON.
"""

from raydiff.rewards.serve.app import app_builder, build_app, deploy, main
from raydiff.rewards.serve.body_limit import BodyLimit
from raydiff.rewards.serve.ingress import API_VERSION, RewardIngress, api
from raydiff.rewards.serve.replica import RewardWorker
from raydiff.rewards.serve.schema import (
    ImageItem,
    MixRequest,
    MixResponse,
    ScoreRequest,
    ScoreResponse,
    decode_item,
)

__all__ = [
    "API_VERSION", "BodyLimit", "ImageItem", "MixRequest", "MixResponse", "RewardIngress", "RewardWorker",
    "ScoreRequest", "ScoreResponse", "api", "app_builder", "build_app", "decode_item", "deploy", "main",
]
