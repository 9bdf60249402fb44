"""`python -m launch [torchrun flags] [--config RECIPE] [--section.field=value ...]`

Validates the whole recipe for the world it will run on, then starts the workers through
torch.distributed.run, or trains in-process when it already is a torchrun worker (LOCAL_RANK
set), so `torchrun --nproc-per-node 4 -m launch --config R` works too.
"""

from __future__ import annotations

import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
