"""Every file a job can publish, by artifact name: the one table the engine writes them by, the worker
records them by (file name, media type) and the API documents them from. Torch-free.

A job's files lie in its working folder's ARTIFACTS_DIR under these file names; the service's storage
key of one is built from the job's id, ARTIFACTS_DIR and the file name (core.storage.Storage.job_key)."""

from __future__ import annotations

from dataclasses import dataclass

ARTIFACTS_DIR = "artifacts"
WEIGHTS = "application/octet-stream"  # safetensors and torch.export programs have no registered media type


@dataclass(frozen=True)
class ArtifactKind:
    """What a job may publish under one artifact name: its file name, media type and what it holds."""

    file_name: str
    media_type: str
    description: str


ARTIFACTS: dict[str, ArtifactKind] = {
    "student": ArtifactKind("student.safetensors", WEIGHTS, "the best student (by validation PGD accuracy), safetensors weights"),
    "swa_student": ArtifactKind("swa_student.safetensors", WEIGHTS, "the best SWA student, safetensors weights"),
    "peer": ArtifactKind("peer.safetensors", WEIGHTS, "the peer tutor at the last epoch, safetensors weights"),
    "last_student": ArtifactKind("last_student.safetensors", WEIGHTS, "the student of the last finished epoch of a stopped job"),
    "student_onnx": ArtifactKind("student.onnx", "application/onnx", "the student as ONNX (opset 17, any batch size), for onnxruntime"),
    "student_pt2": ArtifactKind("student.pt2", WEIGHTS, "the student as a torch.export program, for PyTorch alone"),
    "swa_student_onnx": ArtifactKind("swa_student.onnx", "application/onnx", "the SWA student as ONNX"),
    "swa_student_pt2": ArtifactKind("swa_student.pt2", WEIGHTS, "the SWA student as a torch.export program"),
    "model_card": ArtifactKind("model_card.json", "application/json", "the model card: setup, metrics, evaluation and export status"),
    "model_card_markdown": ArtifactKind("model_card.md", "text/markdown; charset=utf-8", "the model card, for people"),
}
