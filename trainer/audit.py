"""`python -m trainer.audit RUN_DIR ...` (or `--folds DIR --config CONFIG`): likely label errors from
out-of-sample probabilities; the work is in trainer.trained.audit."""

import sys

from trainer.trained.audit import main

if __name__ == "__main__":
    sys.exit(main())
