"""`python -m trainer --config CONFIG [--processes N] [section.key=value ...]`: training on this
machine in one command; the work is in trainer.training.launcher."""

import sys

from trainer.training.launcher import main

if __name__ == "__main__":
    sys.exit(main())
