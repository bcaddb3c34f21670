"""`python -m trainer.fetch_weights`: the command's entry point; the work is in trainer.training.imagenet."""

import sys

from trainer.training.imagenet import main

if __name__ == "__main__":
    sys.exit(main())
