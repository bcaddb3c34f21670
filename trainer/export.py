"""`python -m trainer.export`: the command's entry point; the work is in trainer.trained.export."""

import sys

from trainer.trained.export import main

if __name__ == "__main__":
    sys.exit(main())
