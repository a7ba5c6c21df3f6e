"""The package's exceptions; each is a ValueError, since each means an argument or a file was not what was asked."""

from __future__ import annotations


class ArchitectureError(ValueError):
    """A network cannot be built as asked: bad num_classes or in_channels, or a broken registration."""


class UnknownArchitectureError(ArchitectureError):
    """No architecture is registered under the requested name."""


class InputTooSmallError(ValueError):
    """Images are smaller on a side than an architecture takes."""

    def __init__(self, architecture: str, min_size: int, height: int, width: int):
        self.architecture, self.min_size, self.height, self.width = architecture, min_size, height, width
        super().__init__(f"{architecture} needs inputs of at least {min_size}×{min_size}; the images are {height}×{width}")


class WeightsError(ValueError):
    """A file is not a readable weights file of the PeerAiD service, or its tensors do not fit its architecture."""
