"""Install-time check that the heavy imports work, so the first run or test does not fail late.

DeepSpeed needs no JIT-compiled op here: the optimizer is torch AdamW (`torch_adam`) and the
CPU shm comm op is skipped (`raydiff/engine/learners/deepspeed_stepper.py`); importing DeepSpeed once
also primes its accelerator detection and Python caches.
"""

from __future__ import annotations

import time


def main() -> int:
    import os

    from raydiff.console import worker_env

    os.environ.update(worker_env(verbose=True))  # DS_ACCELERATOR=cpu without a GPU: no probe warning
    t0 = time.time()
    import deepspeed  # noqa: F401
    import diffusers  # noqa: F401
    import ray  # noqa: F401

    print(f"raydiff warmup: deepspeed, diffusers and ray import fine ({time.time() - t0:.1f}s); no ops to compile")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
