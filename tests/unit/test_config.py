"""Settings precedence: defaults < YAML file < EDITSERVE_* environment < CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from editserve.config import ConfigError, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDITSERVE_PORT", raising=False)
    monkeypatch.delenv("EDITSERVE_CONFIG", raising=False)
    s = Settings.load()
    assert s.port == 8000 and s.host == "127.0.0.1" and s.model is None and s.api_key is None


def test_yaml_then_env_then_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("port: 9001\nmax_batch: 4\nhost: 0.0.0.0\n")
    assert Settings.load(config).port == 9001
    monkeypatch.setenv("EDITSERVE_PORT", "9002")
    s = Settings.load(config)
    assert (s.port, s.max_batch, s.host) == (9002, 4, "0.0.0.0")
    s = Settings.load(config, port=9003, max_batch=None)
    assert (s.port, s.max_batch) == (9003, 4)


def test_bad_values_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "missing.yaml")
    monkeypatch.setenv("EDITSERVE_PORT", "99999")
    with pytest.raises(ValueError, match="port"):
        Settings.load()
    monkeypatch.delenv("EDITSERVE_PORT")
    (tmp_path / "typo.yaml").write_text("prot: 1\n")
    with pytest.raises(ValueError, match="prot"):
        Settings.load(tmp_path / "typo.yaml")


def test_api_key_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITSERVE_API_KEY", "k")
    s = Settings.load()
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert "k" not in repr(s.api_key)


def test_memory_encoder_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDITSERVE_CONFIG", raising=False)
    s = Settings.load()
    assert (s.memory_encoder, s.memory_encoder_threads) == ("float32", 1)
    monkeypatch.setenv("EDITSERVE_MEMORY_ENCODER", "int8")
    assert Settings.load().memory_encoder == "int8"
    monkeypatch.setenv("EDITSERVE_MEMORY_ENCODER", "float16")
    with pytest.raises(ValueError, match="memory_encoder"):
        Settings.load()
    monkeypatch.delenv("EDITSERVE_MEMORY_ENCODER")
    with pytest.raises(ValueError, match="memory_encoder_threads"):
        Settings.load(memory_encoder_threads=0)
    assert Settings.load().memory_encoder_runtime == "onnx"
    with pytest.raises(ValueError, match="memory_encoder_runtime"):
        Settings.load(memory_encoder_runtime="tensorrt")
