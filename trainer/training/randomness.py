"""Where a run's randomness comes from: seeds mixed from (seed, epoch, position, rank), so data
order, augmentation and model-side draws are functions of the step; and each process's generator
state, saved with every checkpoint, so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random

import numpy as np
import torch

MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64 over each in turn)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & MASK64
        state ^= state >> 31
    return state >> 1


def rng_state() -> dict:
    """This process's random number generators: what each rank saves beside the shared state, as
    tensors and plain containers (a checkpoint loads with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy = [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
