"""The engine's exceptions: one base type, so callers (the worker, the CLI) can tell an engine
failure the user can act on from a bug, and map each kind to its own message by type.

Every message names the field, file or step at fault in words meant for the user."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every failure the engine reports on purpose."""


class SpecError(EngineError, ValueError):
    """A job spec is invalid; `errors` lists {"field": dotted path, "message": text}."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[dict[str, str]]]]:  # it crosses processes (the API's CPU workers)
        return SpecError, (self.errors,)


class DatasetError(EngineError, ValueError):
    """A dataset could not be loaded; the message names the file, folder or field at fault."""


class CheckpointError(EngineError):
    """A checkpoint or weights file cannot be read, or belongs to another job, dataset or format."""


class ExportError(EngineError):
    """An exported model cannot be read, or its logits disagree with the PyTorch model."""


class TrainingDiverged(EngineError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingCancelled(EngineError):
    """Raised between steps when the callbacks ask to stop; the last epoch checkpoint stays."""
