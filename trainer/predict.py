"""`python -m trainer.predict`: the command's entry point; the work is in trainer.trained.predict."""

import sys

from trainer.trained.predict import main

if __name__ == "__main__":
    sys.exit(main())
