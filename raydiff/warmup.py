"""One-time build/load of native pieces so the first run or test does not pay for it (~50 s for DeepSpeed)."""

from __future__ import annotations

import time


def main() -> int:
    t0 = time.time()
    try:
        from raydiff.engine.deepspeed_stepper import warm_deepspeed
    except ImportError:  # stepper not installed in this build
        print("raydiff warmup: nothing to warm")
        return 0
    warm_deepspeed()
    print(f"raydiff warmup: DeepSpeed ready in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
