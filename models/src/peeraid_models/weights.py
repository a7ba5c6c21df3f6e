"""Weights files of the PeerAiD service, read with PyTorch alone (no safetensors package, no numpy).

A weights file is a safetensors file: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}} plus "__metadata__", strings to strings),
then the tensors' little-endian bytes back to back. The service's metadata is one JSON string under
"peeraid": format, architecture, num_classes, in_channels, input_size and classes, enough for
`load_model` to rebuild the network from the registry."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArchitectureError, WeightsError
from .registry import create_model

WEIGHTS_FORMAT = "peeraid-service/weights-v1"
METADATA_KEY = "peeraid"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
METADATA_FIELDS: dict[str, type] = {"architecture": str, "num_classes": int, "in_channels": int, "input_size": int, "classes": list}

Source = str | os.PathLike[str] | bytes | bytearray | memoryview


def load_model(source: Source, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network a weights file (a path, or the file's bytes) describes, with its weights, in eval mode.

    Every tensor of the architecture must be in the file and nothing else. Returns the model and the
    service's metadata: meta["classes"] names the outputs; the model takes float32 N×C×H×W images in
    [0, 1], C = meta["in_channels"], trained at meta["input_size"] on a side."""
    data, where = _read(source)
    tensors, meta = _decode_weights(data, where)
    try:
        with torch.device("meta"):  # no memory and no random initialisation: the file's tensors become the weights
            model = create_model(meta["architecture"], num_classes=meta["num_classes"], in_channels=meta["in_channels"])
    except ArchitectureError as err:
        raise WeightsError(f"{where}: {err}") from err
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise WeightsError(f"{where}: the tensors do not fit {meta['architecture']}: {err}") from err
    return model.to(device).eval(), meta


def read_weights(source: Source) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the service's metadata of a weights file (a path, or the file's bytes)."""
    return _decode_weights(*_read(source))


def _read(source: Source) -> tuple[bytearray, str]:
    """The file's bytes, writable (torch.frombuffer warns on read-only memory), and how to name them in errors."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytearray(source), "the given bytes"
    path = Path(source)
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data):
            raise WeightsError(f"{path} changed while it was read")
    return data, str(path)


def _decode_weights(data: bytearray, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, metadata = _parse_safetensors(data, where)
    return tensors, _service_metadata(metadata, where)


def _parse_safetensors(data: bytearray, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(data) < 8:
        raise WeightsError(f"{where} is not a safetensors file: {len(data)} bytes, too short for a header")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise WeightsError(f"{where} is not a safetensors file: a header of {header_size:,} bytes in a file of {len(data):,}")
    try:
        header = json.loads(data[8 : 8 + header_size].decode("utf-8"))
    except ValueError as err:
        raise WeightsError(f"{where} is not a safetensors file: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise WeightsError(f"{where} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{where}: __metadata__ must map strings to strings")
    body = torch.frombuffer(data, dtype=torch.uint8)[8 + header_size :]
    tensors = {name: _tensor(name, entry, body, where) for name, entry in header.items()}
    _check_back_to_back(header, len(body), where)
    return tensors, metadata


def _tensor(name: str, entry: Any, body: torch.Tensor, where: str) -> torch.Tensor:
    entry = entry if isinstance(entry, dict) else {}
    dtype, shape, offsets = DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise WeightsError(f"{where}: tensor {name!r} has dtype {entry.get('dtype')!r}; known: {', '.join(DTYPES)}")
    if not _sizes(shape) or not (_sizes(offsets) and len(offsets) == 2):
        raise WeightsError(f"{where}: tensor {name!r} needs a shape (sizes ≥ 0) and data_offsets [begin, end]")
    begin, end = offsets
    size = math.prod(shape) * dtype.itemsize
    if not begin <= end <= len(body) or end - begin != size:
        raise WeightsError(
            f"{where}: tensor {name!r} of shape {shape} needs {size:,} bytes, its data_offsets are {offsets} of {len(body):,}"
        )
    return decode_little_endian(body[begin:end], dtype, shape)


def _sizes(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_back_to_back(header: dict[str, Any], body_size: int, where: str) -> None:
    """Like the safetensors library: the tensors' bytes tile the data with no gap and no overlap."""
    end = 0
    for begin, stop, name in sorted((*entry["data_offsets"], name) for name, entry in header.items()):
        if begin != end:
            raise WeightsError(f"{where}: tensor {name!r} starts at byte {begin} of the data, expected {end} (tensors lie back to back)")
        end = stop
    if end != body_size:
        raise WeightsError(f"{where}: the tensors end at byte {end:,} of {body_size:,} bytes of data")


def decode_little_endian(raw: torch.Tensor, dtype: torch.dtype, shape: list[int], byteorder: str = sys.byteorder) -> torch.Tensor:
    """Little-endian bytes (a uint8 tensor) as a tensor of dtype and shape, in memory of its own: views of one
    buffer would share a version counter, so autograd would take an in-place update of one (BatchNorm's running
    statistics) for a change to every weight, and a view as another dtype needs an aligned offset."""
    if byteorder == "big" and dtype.itemsize > 1:
        own = raw.reshape(-1, dtype.itemsize).flip(1).reshape(-1)  # a copy, in this host's byte order
    else:
        own = raw.clone()
    return own.view(dtype).reshape(shape)


def _service_metadata(metadata: dict[str, str], where: str) -> dict[str, Any]:
    if METADATA_KEY not in metadata:
        raise WeightsError(f"{where} is a safetensors file but not weights of the PeerAiD service: no {METADATA_KEY!r} metadata")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except ValueError as err:
        raise WeightsError(f"{where}: its {METADATA_KEY!r} metadata is not JSON ({err})") from err
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != WEIGHTS_FORMAT:
        raise WeightsError(f"{where} is not a weights file of the PeerAiD service (format {found!r}, expected {WEIGHTS_FORMAT!r})")
    for key, kind in METADATA_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise WeightsError(f"{where}: its metadata's {key} should be of type {kind.__name__}, got {meta.get(key)!r}")
    classes = meta["classes"]
    if len(classes) != meta["num_classes"] or not all(isinstance(c, str) for c in classes):
        raise WeightsError(f"{where}: its metadata names {len(classes)} classes for {meta['num_classes']} outputs")
    return meta
