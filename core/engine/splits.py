"""How a class is split: how many of its images are held out (for validation, or a folder upload's
test set), and the seeded permutations torch draws, reproduced with numpy. Needs no torch, so the
upload check and the engine split alike."""

from __future__ import annotations

import numpy as np


def held_out_count(class_size: int, fraction: float) -> int:
    """`fraction` of the class, rounded, but at least 1 and never all of it; none of a class of 0 or 1."""
    return min(class_size - 1, max(1, round(fraction * class_size))) if class_size > 1 else 0


class TorchPermutations:
    """The permutations `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` draws, one call
    after another, without torch: the same Mersenne Twister (numpy's legacy one, seeded alike) and torch's
    CPU shuffle (swap i with i + random() % (n - i)), which torch uses for every n under 2**32 / 20."""

    def __init__(self, seed: int):
        self._state = np.random.RandomState(seed)  # seeds MT19937 exactly as torch's CPU generator does (0 <= seed < 2**32)

    def randperm(self, n: int) -> np.ndarray:
        permutation = np.arange(n, dtype=np.int64)
        if n < 2:
            return permutation
        draws = self._state.randint(0, 2**32, size=n - 1, dtype=np.uint64)  # raw 32-bit outputs, as torch's random()
        offsets = (draws % np.arange(n, 1, -1, dtype=np.uint64)).tolist()
        values = permutation.tolist()
        for i, offset in enumerate(offsets):
            j = i + offset
            values[i], values[j] = values[j], values[i]
        return np.array(values, dtype=np.int64)
