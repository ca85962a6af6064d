"""Who may edit without an admin key: loopback clients, and no proxy makes a client loopback.

Requests go through what `editserve serve` runs: the uvicorn configuration the CLI builds
(loaded by uvicorn itself, proxy-header middleware included when configured) around the server,
with the TCP peer chosen per request. Only the socket is left out: `uvicorn.run` is replaced by
a recorder of what it was given, and the model is a tiny one.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from editserve import cli
from editserve.config import Settings
from tests.conftest import build_test_app, tiny_model

LOCAL, REMOTE = "127.0.0.1", "203.0.113.7"
ADMIN = "admin-secret"


def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> uvicorn.Config:
    """`editserve serve FLAGS` up to the point where uvicorn would bind: its loaded config."""
    monkeypatch.setenv("EDITSERVE_STATE_DIR", str(tmp_path / "state"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # serve sets the root level: restored after

    def build_server(settings: Settings):  # noqa: ANN202 (the real composition, a tiny model)
        given = settings.model_dump(exclude={"state_dir"})
        return build_test_app(tiny_model("llama"), settings.state_dir, **given)

    served: dict = {}
    monkeypatch.setattr(cli, "build_server", build_server)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    assert cli.main(["serve", *flags]) == 0
    app = served.pop("app")
    config = uvicorn.Config(app, **served)
    config.load()
    return config


def status(config: uvicorn.Config, peer: str, headers: dict[str, str] | None = None) -> int:
    """GET /edits from the TCP peer `peer`, as uvicorn hands it to the app."""

    async def get() -> int:
        transport = httpx.ASGITransport(app=config.loaded_app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://editserve") as c:
            return (await c.get("/edits", headers=headers or {})).status_code

    return asyncio.run(get())


def test_by_default_no_forwarded_header_makes_a_client_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("EDITSERVE_ADMIN_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="editserve"):
        config = serve(tmp_path, monkeypatch)
    assert config.proxy_headers is False  # uvicorn's own default trusts 127.0.0.1's headers
    open_warnings = [r for r in caplog.records if "EDITSERVE_ADMIN_KEY is unset" in r.message]
    assert len(open_warnings) == 1 and "loopback" in open_warnings[0].message

    assert status(config, LOCAL) == 200
    assert status(config, "::1") == 200
    # A remote client claiming to be local, directly or through a same-host proxy that passes
    # the header on (a port-forward: the peer is loopback).
    assert status(config, REMOTE, {"X-Forwarded-For": LOCAL}) == 403
    assert status(config, LOCAL, {"X-Forwarded-For": LOCAL}) == 403
    assert status(config, LOCAL, {"X-Forwarded-For": REMOTE}) == 403
    assert status(config, LOCAL, {"Forwarded": f"for={REMOTE}"}) == 403
    assert status(config, LOCAL, {"X-Real-IP": REMOTE}) == 403


def test_the_refusal_says_what_to_configure(tmp_path: Path) -> None:
    app = build_test_app(tiny_model("llama"), tmp_path)
    with TestClient(app, client=(LOCAL, 5000)) as c:
        r = c.get("/edits", headers={"X-Forwarded-For": REMOTE})
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["type"] == "permission_error"
    assert "proxy" in error["message"] and "EDITSERVE_ADMIN_KEY" in error["message"]
    assert "EDITSERVE_FORWARDED_ALLOW_IPS" in error["message"]


def test_trusted_proxies_name_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDITSERVE_ADMIN_KEY", raising=False)
    config = serve(tmp_path, monkeypatch, "--forwarded-allow-ips", LOCAL)
    assert config.proxy_headers is True
    assert status(config, LOCAL, {"X-Forwarded-For": LOCAL}) == 200  # a local client, proxied
    assert status(config, LOCAL, {"X-Forwarded-For": REMOTE}) == 403
    # A proxy appends the address it saw to what the client sent: the client is the last one.
    assert status(config, LOCAL, {"X-Forwarded-For": f"{LOCAL}, {REMOTE}"}) == 403
    assert status(config, REMOTE, {"X-Forwarded-For": LOCAL}) == 403  # not a trusted proxy
    # Only X-Forwarded-For is understood: a proxy sending Forwarded alone names nobody.
    assert status(config, LOCAL, {"Forwarded": f"for={LOCAL}"}) == 403


def test_the_setting_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDITSERVE_ADMIN_KEY", raising=False)
    monkeypatch.setenv("EDITSERVE_FORWARDED_ALLOW_IPS", "10.0.0.0/8")
    config = serve(tmp_path, monkeypatch)
    assert config.proxy_headers is True and config.forwarded_allow_ips == "10.0.0.0/8"
    assert status(config, "10.1.2.3", {"X-Forwarded-For": REMOTE}) == 403
    assert status(config, "10.1.2.3", {"X-Forwarded-For": LOCAL}) == 200


def test_with_an_admin_key_the_key_decides_and_nothing_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EDITSERVE_ADMIN_KEY", ADMIN)
    with caplog.at_level(logging.WARNING, logger="editserve"):
        config = serve(tmp_path, monkeypatch)
    assert not [r for r in caplog.records if "EDITSERVE_ADMIN_KEY is unset" in r.message]
    key = {"Authorization": f"Bearer {ADMIN}"}
    assert status(config, REMOTE, {**key, "X-Forwarded-For": REMOTE}) == 200
    assert status(config, LOCAL, {"X-Forwarded-For": LOCAL}) == 401


def test_a_client_host_that_is_no_address_is_not_loopback(tmp_path: Path) -> None:
    # starlette's TestClient calls from "testclient"; production code knows no such host.
    app = build_test_app(tiny_model("llama"), tmp_path)
    for host in ("testclient", "localhost"):
        with TestClient(app, client=(host, 5000)) as c:
            assert c.get("/edits").status_code == 403
