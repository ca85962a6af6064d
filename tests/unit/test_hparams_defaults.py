"""Method defaults are package data, and a model none of them applies to stops the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from editserve.edits.journal import Journal
from editserve.edits.service import EditService
from editserve.engine.transformers_engine import TransformersEngine
from methods import hparams
from methods.hparams import MissingDefaults, defaults_for
from methods.memit import load_memit_hparams
from tests.conftest import tiny_model


def test_the_configs_are_read_from_the_methods_package() -> None:
    root = Path(str(hparams.CONFIG_ROOT))
    assert root == Path(hparams.__file__).parent / "configs"
    assert (root / "memit" / "llama-30.yaml").is_file()
    assert load_memit_hparams("llama", 30).mom2_update_weight == 100.0  # not the papers' 15000


def test_a_family_without_its_own_file_gets_default_yaml(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hparams, "_warned", set())  # told once per process: forget earlier tests
    assert defaults_for("memit", "qwen2", 28)["mom2_update_weight"] == 15000.0
    assert "memit: no tuned defaults for qwen2 with 28 layers" in caplog.text
    # IKE has one file for every model: nothing is missing, nothing to warn about.
    assert defaults_for("ike", "qwen2", 28)["threshold"] > 0
    assert "ike:" not in caplog.text


def test_no_defaults_file_is_a_loud_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a file for another depth: nothing applies to a 30-layer llama.
    (tmp_path / "memit").mkdir()
    (tmp_path / "memit" / "llama-32.yaml").write_text(
        "match: {model_types: [llama], num_layers: 32}\nhparams: {layers: [4, 5, 6, 7, 8]}\n"
    )
    monkeypatch.setattr(hparams, "CONFIG_ROOT", tmp_path)
    with pytest.raises(MissingDefaults) as err:
        load_memit_hparams("llama", 30)
    message = str(err.value)
    assert "memit" in message and "'llama' (30 layers)" in message
    assert str(tmp_path / "memit") in message
    assert load_memit_hparams("llama", 32).layers == (4, 5, 6, 7, 8)


def test_a_server_without_its_configs_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hparams, "CONFIG_ROOT", tmp_path / "nowhere")
    engine = TransformersEngine(tiny_model("llama"))
    with pytest.raises(MissingDefaults, match="no .* hyperparameter defaults for model family"):
        EditService(engine, Journal(tmp_path / "state"))


def test_serve_without_its_configs_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from editserve import cli
    from editserve.config import Settings
    from tests.conftest import build_test_app

    def build_server(settings: Settings):  # noqa: ANN202 (the real composition, a tiny model)
        return build_test_app(tiny_model("llama"), tmp_path / "state")

    monkeypatch.setattr(hparams, "CONFIG_ROOT", tmp_path / "nowhere")
    monkeypatch.setattr(cli, "build_server", build_server)
    assert cli.main(["serve"]) == 2  # no traceback: the exit code and one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("editserve: ") and "defaults" in err[0]
