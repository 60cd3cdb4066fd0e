"""A quiet console: raydiff's own lines on the terminal, Ray/Serve/Train/DeepSpeed internals in a log file.

A healthy run used to print dozens of Ray Train, core-worker and DeepSpeed lines that read like
failures. By default (`quiet`) everything those libraries say goes to `<out>/logs/console.log`
(driver loggers and the stdout/stderr of every actor), while raydiff prints its progress bar,
one summary line per epoch and the result. `--verbose` keeps the old behaviour: all on the terminal.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from pathlib import Path

# Library loggers of the driver process whose records belong in the log file when quiet.
LIBRARY_LOGGERS = ("ray", "ray.serve", "ray.train", "ray.tune", "ray.data", "deepspeed", "DeepSpeed",
                   "diffusers", "transformers", "torch.distributed", "filelock", "urllib3", "httpx")

# Set for every Ray worker too (runtime_env): they silence per-actor weight-loading bars and
# library chatter at its source, so even the log file stays readable.
QUIET_WORKER_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

_state: dict = {"verbose": True, "log_path": None, "file": None}


def fmt(x, digits: int = 4) -> str:
    """A figure to `digits` significant digits (ints stay ints; NaN/None read 'n/a')."""
    if x is None:
        return "n/a"
    if isinstance(x, (bool, int)) and not isinstance(x, float):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "n/a"
    return f"{x:.{digits}g}"


def worker_env(verbose: bool) -> dict[str, str]:
    """Env vars for Ray workers (runtime_env): quiet library output, CPU accelerator without probing."""
    env = {} if verbose else dict(QUIET_WORKER_ENV)
    if not os.environ.get("DS_ACCELERATOR") and not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed otherwise warns "Setting accelerator to CPU" in every actor
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no CUDA here
        return False


def setup(out_dir: str | Path | None, verbose: bool) -> Path | None:
    """Route library logging to `<out_dir>/logs/console.log` unless verbose; returns the log path (or None).

    raydiff's own loggers still reach the terminal at WARNING and above (INFO goes to the file).
    Call before ray.init; call `after_ray_init()` once Ray is up to capture actor output too.
    """
    _state["verbose"] = verbose
    for k, v in worker_env(verbose).items():
        os.environ.setdefault(k, v)  # the driver process too (DeepSpeed/diffusers imported here)
    fmt_ = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    if verbose or out_dir is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return None
    import ray  # noqa: F401 - its import installs a stderr handler on "ray"; replace it, not the other way round

    try:
        import ray.serve  # noqa: F401 - likewise for "ray.serve" (its INFO lines per deploy/request)
    except ImportError:
        pass

    log_dir = Path(out_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "console.log"
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt_)
    fh.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("raydiff: %(levelname)s %(message)s"))
    console.setLevel(logging.WARNING)
    console.addFilter(_ours_or_error)
    root.handlers[:] = [fh, console]
    root.setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        # Through the root's two handlers: all to the file, only ERROR+ to the terminal. (ray.init with
        # configure_logging=False clears the "ray" logger's handlers, so none are kept there.)
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    _silence_library_bars()
    _state.update(log_path=path, file=open(path, "a", buffering=1))
    return path


def _ours_or_error(record: logging.LogRecord) -> bool:
    """Terminal filter: raydiff's warnings, and anyone's errors."""
    return record.name.startswith("raydiff") or record.name == "__main__" or record.levelno >= logging.ERROR


def _silence_library_bars() -> None:
    try:
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - optional
        pass


def ray_init_kwargs() -> dict:
    """Extra ray.init arguments for the chosen console mode."""
    if _state["verbose"]:
        return {}
    return {"configure_logging": False}


def after_ray_init() -> None:
    """Quiet mode: actor stdout/stderr (forwarded by Ray to the driver) goes to the log file, not the terminal."""
    if _state["verbose"] or _state["file"] is None:
        return
    try:
        from ray._private import ray_logging

        dispatcher = ray_logging.global_worker_stdstream_dispatcher
    except Exception:  # noqa: BLE001 - private API moved: fall back to Ray's own log files
        return
    lock, sink = threading.Lock(), _state["file"]

    def to_file(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}) "
        with lock:
            for line in data.get("lines", []):
                sink.write(prefix + line + "\n")

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("raydiff_log_file", to_file)


def log_path() -> Path | None:
    return _state["log_path"]


def is_verbose() -> bool:
    return bool(_state["verbose"])


def epoch_summary(epoch: int, num_epochs: int, metrics: dict) -> str:
    """One line per epoch: reward mean ± std, the loss when reported, epoch time (4 significant digits)."""
    parts = [f"epoch {epoch + 1}/{num_epochs}"]
    if "reward/mean" in metrics:
        std = f" ± {fmt(metrics['reward/std'])}" if "reward/std" in metrics else ""
        parts.append(f"reward {fmt(metrics['reward/mean'])}{std}")
    if "train/loss" in metrics:
        parts.append(f"loss {fmt(metrics['train/loss'])}")
    if "time/epoch_s" in metrics:
        parts.append(f"{fmt(metrics['time/epoch_s'], 3)} s")
    return "  ".join(parts)
