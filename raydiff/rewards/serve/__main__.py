"""`python -m raydiff.rewards.serve [--config ...]`: the same as `raydiff serve-rewards`."""

import sys

from raydiff.rewards.serve.app import main

sys.exit(main())
