"""Typed config of reward deployments: the one schema `raydiff serve-rewards` and the trainer share.

One `RewardComponent` per reward becomes one Ray Serve deployment (`reward_<name>`):
the trainer's `reward.components` (backend=serve) and the service's `rewards` list are
the same class, so a reward asks for the same CPUs, GPUs, custom resources ({reward: 1}
pins it to the cluster's reward node type), autoscaling and batching wherever it is
deployed. The service puts all of them behind one FastAPI ingress deployment.

Reuse: every deployment carries a hash of its config (`deployment_hash`, everything but
`weight`, which callers apply themselves) in its Serve user_config; a running app is
reused only when the hashes match (raydiff/rewards/serve/reuse.py). Batching:
`@serve.batch` merges up to `max_batch_size` *requests* (each holding one or
more images) that arrive within `batch_wait_timeout_s`; the merged images are
scored in model batches of at most `max_images_per_forward`. For batching to
happen a replica must accept several requests at once, so
`max_ongoing_requests >= max_batch_size` is enforced here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raydiff.config_base import Section, build, load_yaml

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


class AutoscalingSection(Section):
    """Serve autoscaling for one reward deployment (replaces num_replicas when set)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept alive (0 allows scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Most replicas Serve may start; each takes num_cpus/num_gpus.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in flight per replica Serve aims for; lower = more replicas sooner."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds demand must stay high before Serve adds replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Seconds demand must stay low before Serve removes replicas.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class RewardComponent(Section):
    """One reward: what to build (reward, args), its weight, and how Serve runs it (resources, replicas, batching).

    The deployment fields apply wherever the reward runs on Serve (`raydiff serve-rewards`, or the
    trainer with reward.backend=serve); with reward.backend=local only name/reward/args/weight matter."""

    name: str = Field(..., description="Name in URLs (/v1/rewards/<name>:score), handles and metrics (reward/<name>); [a-z0-9_-], unique.")
    reward: str | None = Field(None, description="Registry reward to build (aesthetic, clip_score, ...); default: `name`.")
    args: dict = Field(
        default_factory=dict,
        description="Keyword arguments of the reward: weights paths or hub ids (clip_path, head_path, ...).",
    )
    weight: float = Field(1.0, allow_inf_nan=False, description="Weight in the trainer's summed reward, and the default weight in POST /v1/score.")
    max_batch_size: int = Field(16, ge=1, description="Most requests @serve.batch merges into one scoring call (1 = no batching).")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Seconds a partial batch waits for more requests; adds up to this much latency."
    )
    max_images_per_forward: int = Field(
        64, ge=1, description="Images per model forward pass; a merged batch is chunked to bound (GPU) memory."
    )
    num_replicas: int = Field(1, ge=1, description="Fixed replica count; ignored when autoscaling_config is set.")
    autoscaling_config: AutoscalingSection | None = Field(None, description="Autoscale between min and max replicas instead of num_replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (logical Ray CPUs).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions pack several rewards on one GPU.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {reward: 1} to run on the cluster's reward node type.",
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica handles at once; must be >= max_batch_size.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests queued per caller before Serve rejects with BackPressureError (-> 503); -1 = unbounded."
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"reward name {v!r} must match [a-z0-9][a-z0-9_-]* (it appears in URLs)")
        return v

    @field_validator("resources")
    @classmethod
    def _resources_ok(cls, v: dict[str, float]) -> dict[str, float]:
        for k, amount in v.items():
            if k in ("CPU", "GPU"):
                raise ValueError(f"resources may not name {k!r}; use num_cpus / num_gpus instead")
            if not amount > 0:
                raise ValueError(f"resources.{k} must be > 0, got {amount}; drop the key to ask for none")
        return v

    @model_validator(mode="after")
    def _batching_possible(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): "
                "a replica would never see a full batch; raise max_ongoing_requests"
            )
        return self

    @property
    def registry_name(self) -> str:
        return self.reward or self.name

    @property
    def deployment_name(self) -> str:
        return f"reward_{self.name}"

    def deployment_config(self) -> dict:
        """Everything that defines the running deployment (all fields but `weight`), JSON-safe."""
        return self.model_dump(mode="json", exclude={"weight"})

    def deployment_hash(self) -> str:
        """sha256 (16 hex) of deployment_config(): equal hashes = interchangeable deployments."""
        return _hash(self.deployment_config())



def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _default_rewards() -> list[RewardComponent]:
    return [RewardComponent(name="brightness", num_cpus=0.5),
            RewardComponent(name="jpeg_compressibility", num_cpus=0.5)]


class RewardServiceConfig(Section):
    """The whole service: HTTP endpoint, limits, auth and the rewards it serves."""

    host: str = Field("127.0.0.1", description="Interface Serve's HTTP proxy binds; 0.0.0.0 to accept remote clients.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of Serve's proxy (shared by every Serve app on the cluster).")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Serve runs HTTP proxies (cluster-wide, set when Serve starts): every node, or the head only."
    )
    app_name: str = Field("raydiff-rewards", description="Serve application name; the trainer's reward.serve_app must match.")
    route_prefix: str = Field("/", description="URL prefix of this app on the proxy, e.g. / or /rewards.")
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="Largest request body in bytes; larger bodies get 413.")
    max_images_per_request: int = Field(256, ge=1, description="Most images in one request; more gets 413.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest H*W of one decoded image; larger items get a per-item error.")
    max_inflight_requests: int = Field(
        512, ge=1, description="Scoring requests one ingress replica handles at once; beyond that 503 + Retry-After."
    )
    retry_after_s: int = Field(1, ge=0, description="Seconds sent in Retry-After with 503 responses.")
    token_env: str = Field(
        "RAYDIFF_REWARD_TOKEN",
        description="Env var read at deploy time; when set and non-empty every /v1 call needs 'Authorization: Bearer <token>'.",
    )
    ingress_num_replicas: int = Field(1, ge=1, description="Replicas of the FastAPI ingress (decoding, auth, fan-out).")
    ingress_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica.")
    reuse: Literal["error", "replace"] = Field(
        "error", description="An app named app_name already runs with another config: error (refuse) or replace it."
    )
    rewards: list[RewardComponent] = Field(
        default_factory=_default_rewards, description="Served rewards; one Serve deployment each."
    )

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix {v!r} must start with '/'")
        return v

    @model_validator(mode="after")
    def _unique(self):
        if not self.rewards:
            raise ValueError("rewards is empty; serve at least one, e.g. [{name: brightness}]")
        names = [r.name for r in self.rewards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rewards: duplicate names {dup}; give each served reward its own name")
        return self

    def app_hash(self) -> str:
        """sha256 (16 hex) of the app's config (not reuse, nor the proxies' host/port/location): equal hashes = the same app."""
        return _hash(self.model_dump(mode="json", exclude={"reuse", "host", "port", "proxy_location"}))

    def reward(self, name: str) -> RewardComponent:
        for r in self.rewards:
            if r.name == name:
                return r
        raise KeyError(name)

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        prefix = self.route_prefix.rstrip("/")
        return f"http://{host}:{self.port}{prefix}"


def load_service_config(path: str | Path | None = None, **overrides) -> RewardServiceConfig:
    """Read a service YAML (or defaults when path is None); keyword overrides win (e.g. host, port)."""
    data = load_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build(RewardServiceConfig, data)
