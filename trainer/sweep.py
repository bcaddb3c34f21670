"""`python -m trainer.sweep`: the command's entry point; the work is in trainer.runs.sweep."""

import sys

from trainer.runs.sweep import main

if __name__ == "__main__":
    sys.exit(main())
