"""``python -m grpo_fused``: the same as the ``grpo-fused`` command."""

import sys

from .cli import main

sys.exit(main())
