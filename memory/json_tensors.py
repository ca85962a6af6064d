"""JSON inside a flat dict of tensors: how the memory's exact snapshots (`to_tensors`) carry
their metadata next to the tensors, so one safetensors payload holds both."""

from __future__ import annotations

import json
from typing import Any

import torch


def json_tensor(obj: Any) -> torch.Tensor:
    """`obj` as JSON bytes in a uint8 tensor."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(tensor: torch.Tensor) -> Any:
    """Inverts `json_tensor`."""
    return json.loads(bytes(tensor.numpy().tobytes()).decode())
