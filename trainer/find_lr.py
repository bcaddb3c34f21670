"""`python -m trainer.find_lr --config CONFIG [--processes N]` (or `accelerate launch ... trainer/find_lr.py`):
the learning-rate range test's entry point; the work is in trainer.training.lr_finder."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch trainer/find_lr.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.training.lr_finder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
