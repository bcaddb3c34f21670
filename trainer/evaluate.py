"""`python -m trainer.evaluate` (or `accelerate launch ... -m trainer.evaluate`): the command's
entry point; the work is in trainer.trained.evaluate."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch trainer/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.trained.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
