"""The built wheel, installed outside the checkout, resolves the tuned hyperparameters.

Builds the package's wheel from a copy of the sources (offline: no build isolation, no index),
installs it with `pip --target` into a scratch folder and imports it from there, in a process
whose working directory is outside the repository, so nothing of the checkout can be read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, methods
from methods.grace import load_grace_hparams
from methods.memit import load_memit_hparams
from methods.rome import load_rome_hparams
rome, memit, grace = (f("llama", 30) for f in (load_rome_hparams, load_memit_hparams,
                                               load_grace_hparams))
print(json.dumps({"package": methods.__file__, "memit_lambda": memit.mom2_update_weight,
                  "memit_layers": list(memit.layers), "grace_layer": grace.layer,
                  "grace_radius": grace.radius, "rome_covariance": rome.covariance}))
"""


def _pip(*args: str | Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _family_file(method: str) -> dict:
    return yaml.safe_load((ROOT / "methods" / "configs" / method / "llama-30.yaml").read_text())[
        "hparams"
    ]


def test_an_installed_wheel_serves_the_tuned_hyperparameters(tmp_path: Path) -> None:
    # A copy of what the wheel is built from (the packages pyproject.toml names), so the build
    # leaves nothing (build/, *.egg-info) in the shared checkout.
    source = tmp_path / "source"
    source.mkdir()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for pattern in packages:
        package = pattern.rstrip("*")
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    dist = tmp_path / "dist"
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source)
    (wheel,) = dist.glob("editserve-*.whl")
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", site, wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(got["package"]).is_relative_to(site)  # the installed copy, not the checkout
    memit, grace, rome = _family_file("memit"), _family_file("grace"), _family_file("rome")
    assert got["memit_lambda"] == memit["mom2_update_weight"] != 15000.0
    assert got["memit_layers"] == memit["layers"]
    assert got["grace_layer"] == grace["layer"] and got["grace_radius"] == grace["radius"]
    assert got["rome_covariance"] == rome["covariance"] == "context"
