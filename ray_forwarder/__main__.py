"""`python -m ray_forwarder` (what `ray job submit -- python -m ray_forwarder` runs)."""

import sys

from ray_forwarder.cli import main

sys.exit(main())
