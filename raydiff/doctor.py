"""`raydiff doctor [CONFIG] [key=value ...]`: will a run start here, and if not, why.

Checks, without starting Ray or loading weights: library versions, devices and dtypes, which
Ray mode a run would use (embedded or join) and whether the cluster to join answers, whether
the run dir is writable, and whether the config's model paths resolve offline. Exit status 1
(with the reasons) when a run would fail, 2 for a bad config, else 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from pathlib import Path

from raydiff.config import ConfigError, RunConfig, load_config

LIBRARIES = ("torch", "diffusers", "transformers", "ray", "deepspeed", "peft")


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def ok(self, what: str) -> None:
        print(f"  ok    {what}")

    def note(self, what: str) -> None:
        print(f"  note  {what}")

    def fail(self, what: str) -> None:
        print(f"  FAIL  {what}")
        self.failures.append(what)


def check_versions(r: Report) -> None:
    found = [f"python {sys.version.split()[0]}"]
    from raydiff.console import worker_env

    os.environ.update(worker_env(verbose=True))  # DS_ACCELERATOR=cpu without a GPU: no probe warning
    for name in LIBRARIES:
        try:
            found.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception as e:  # noqa: BLE001 - any import failure means a run fails
            r.fail(f"{name} does not import ({type(e).__name__}: {str(e)[:120]}); run ./install.sh")
    r.ok(", ".join(found))


def check_devices(r: Report, cfg: RunConfig | None, embedded: bool) -> None:
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        bf16 = torch.cuda.is_bf16_supported()
        r.ok(f"devices: {torch.cuda.device_count()} CUDA GPU(s) ({', '.join(names)}), {os.cpu_count()} CPUs; "
             f"dtypes float32, float16{', bfloat16' if bf16 else ''} (model.dtype=auto -> {'bfloat16' if bf16 else 'float32'})")
        return
    r.ok(f"devices: CPU only ({os.cpu_count()} cores, no CUDA GPU); dtypes float32, bfloat16 (model.dtype=auto -> float32)")
    if cfg is None or not embedded:
        return
    wants = [f for f, v in (("learner.use_gpu", cfg.learner.use_gpu), ("rollout.num_gpus", cfg.rollout.num_gpus > 0)) if v]
    if wants:
        r.fail(f"{', '.join(wants)} asks for GPUs but this machine has none and the run would be embedded; "
               "set them to false/0, or join a GPU cluster (RAY_ADDRESS / ray_address)")
    if cfg.model.dtype == "float16":
        r.note("model.dtype=float16 on CPU is slow and some ops lack float16 kernels; float32 or bfloat16 is safer")


def _reachable(address: str) -> bool:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def check_ray(r: Report, cfg: RunConfig | None) -> bool:
    """Report the mode a run would use; returns True for embedded."""
    from raydiff.engine.trainer import join_address

    address = join_address(cfg) if cfg is not None else (os.environ.get("RAY_ADDRESS") or None)
    auth = os.environ.get("RAY_AUTH_MODE", "unset")
    if not address:
        r.ok("ray: embedded mode (no RAY_ADDRESS, no ray_address): each run starts its own local cluster "
             f"and stops it at exit; any other cluster on this machine is left alone (RAY_AUTH_MODE={auth})")
        return True
    source = "ray_address" if cfg is not None and cfg.ray_address else "RAY_ADDRESS"
    if address == "auto":
        from ray._common.utils import get_ray_address_file

        f = Path(get_ray_address_file(None))
        address = f.read_text().strip() if f.is_file() else ""
        if not address:
            r.fail(f"ray: join mode ({source}=auto) but no cluster was started on this machine ({f} missing); "
                   "run `ray start --head` or unset it for embedded mode")
            return False
    if _reachable(address):
        r.ok(f"ray: join mode ({source}={address}): the cluster answers (RAY_AUTH_MODE={auth}; with token auth "
             "the token must be in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    else:
        r.fail(f"ray: join mode ({source}={address}) but nothing answers there; start it (`ray start --head`) "
               "or unset RAY_ADDRESS / ray_address for embedded mode")
    return False


def check_run_dir(r: Report, cfg: RunConfig) -> None:
    if cfg.output.storage:
        check_storage(r, cfg)
        return
    run_dir = Path(cfg.run_dir).resolve()
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        r.ok(f"run dir {cfg.run_dir} is writable" + ("" if probe == run_dir else f" (will be created under {probe})"))
    else:
        r.fail(f"run dir {cfg.run_dir}: {probe} is not a writable folder; set output.run_dir=<a writable path>")


def check_storage(r: Report, cfg: RunConfig) -> None:
    """output.storage from this machine: write, read back and delete a probe file."""
    from raydiff.engine.storage import Storage, read_probe, redact, run_location, write_probe

    where = redact(run_location(cfg))
    try:
        store = Storage(run_location(cfg))
        name = write_probe(store)
        err = read_probe(store.uri, name)
        store.delete(name)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    if err:
        r.fail(f"output.storage {where}: {err}; check the URI, its endpoint and the credentials in this environment")
    else:
        r.ok(f"run storage {where} is writable from here (each node is checked again when a run starts)")


def _hub_cached(repo: str, filename: str, revision: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)
    except Exception:  # noqa: BLE001 - malformed ids are simply not cached
        return False


def check_model_paths(r: Report, cfg: RunConfig) -> None:
    from raydiff.models.loader import read_model_index

    path = cfg.model.path
    if path.startswith("tiny://"):
        r.ok(f"model.path {path}: a tiny random model, built offline (cache: {os.environ.get('RAYDIFF_CACHE') or '~/.cache/raydiff'})")
    elif Path(path).expanduser().is_dir():
        try:
            read_model_index(str(Path(path).expanduser()))
            r.ok(f"model.path {path}: a local diffusers folder")
        except ConfigError as e:
            r.fail(str(e))
    elif _hub_cached(path, "model_index.json", cfg.model.revision):
        r.ok(f"model.path {path}: in the Hugging Face cache (loads offline)")
    else:
        r.fail(f"model.path {path!r} does not resolve offline: no such folder and not in the Hugging Face cache; "
               "download it (huggingface-cli download ID) or give a local diffusers folder or tiny://sd")
    for comp in cfg.reward.components:
        for key, value in comp.args.items():
            if not (key.endswith("path") and isinstance(value, str)) or value.startswith("tiny://"):
                continue
            where = f"reward.components[{comp.name}].args.{key}={value}"
            if Path(value).expanduser().exists() or _hub_cached(value, "config.json"):
                r.ok(f"{where} resolves offline")
            else:
                r.fail(f"{where} does not resolve offline (no such file or folder, not in the Hugging Face cache)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydiff doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="YAML config to check (e.g. configs/tiny_ddpo.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # "resolves offline" means exactly that
    cfg = None
    if args.config or args.overrides:
        try:
            cfg = load_config(args.config, list(args.overrides))
        except (ConfigError, ValueError) as e:
            print(f"raydiff doctor: {e}", file=sys.stderr)
            return 2
    print(f"raydiff doctor{f' ({args.config})' if args.config else ''}")
    r = Report()
    check_versions(r)
    embedded = check_ray(r, cfg)
    check_devices(r, cfg, embedded)
    if cfg is not None:
        check_run_dir(r, cfg)
        check_model_paths(r, cfg)
    if r.failures:
        print(f"a run would fail: {len(r.failures)} problem(s) above (FAIL)")
        return 1
    print("a run would start" if cfg is not None else "environment ok (give a config to check a run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
