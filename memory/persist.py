"""Crash-safe files for the memory: tensors in safetensors, metadata in JSON.

A bundle is a folder holding `meta.json` and the tensors file it names. The tensors are written
first under a fresh name; `meta.json` is replaced last, atomically, and is the commit point: a
crash at any moment leaves either the old bundle or the new one readable, never a mix. Tensors
files that `meta.json` no longer names are deleted after the commit (or on the next save).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

META_FILE = "meta.json"
_TENSORS_PREFIX = "tensors-"


def json_tensor(obj: Any) -> torch.Tensor:
    """JSON as a uint8 tensor, so metadata can travel inside a flat dict of tensors."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.numpy().tobytes()).decode())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """`write(tmp_path)` fills a temporary file beside `path`, which then replaces `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_bundle(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{_TENSORS_PREFIX}{uuid.uuid4().hex[:12]}.safetensors"
    flat = {k: t.contiguous() for k, t in tensors.items()}
    _write_atomic(directory / name, lambda tmp: save_file(flat, str(tmp)))
    text = json.dumps({**meta, "tensors_file": name}, indent=1)
    _write_atomic(directory / META_FILE, lambda tmp: tmp.write_text(text))
    _fsync_dir(directory)
    for stale in directory.glob(f"{_TENSORS_PREFIX}*.safetensors"):
        if stale.name != name:
            stale.unlink(missing_ok=True)


def load_bundle(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    tensors = load_file(str(directory / meta.pop("tensors_file")))
    return tensors, meta
