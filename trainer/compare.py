"""`python -m trainer.compare`: the command's entry point; the work is in trainer.runs.compare."""

import sys

from trainer.runs.compare import main

if __name__ == "__main__":
    sys.exit(main())
