"""Hostile or careless requests get a clear 4xx; keys, limits and persisted formats hold.

In-process on a tiny random model (max context 128 tokens) with the stand-in edit method.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from editserve.api.limits import RateLimiter
from editserve.config import Settings
from tests.conftest import build_test_app, tiny_model
from tests.standin import install_shift, weights_hash

MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
EDIT = {
    "method": "shift",
    "requests": [
        {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}
    ],
    "checks": False,
}
ADMIN, USER = "admin-secret", "user-secret"


def make_client(state_dir: Path, **settings: object) -> TestClient:
    return TestClient(build_test_app(tiny_model("llama", max_len=128), state_dir, **settings))


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    install_shift(monkeypatch)
    with make_client(tmp_path, max_request_bytes=64 * 1024) as c:
        yield c


def assert_clear_4xx(response, status: int) -> str:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert len(error["message"]) > 15, error
    return error["message"]


def raw(client: TestClient, path: str, body: bytes):  # noqa: ANN201
    return client.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/edits"])
def test_oversized_bodies_are_413_before_parsing(client: TestClient, path: str) -> None:
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]})
    message = assert_clear_4xx(raw(client, path, body.encode()), 413)
    assert "65536 bytes" in message


def test_a_chunked_oversized_body_is_413_too(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    r = client.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_clear_4xx(r, 413)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "nested"),
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "nested"),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            "UTF-8",
        ),
        (b'{"model": "tiny-llama", "messages": [', "JSON"),
        (b"", "empty"),
    ],
    ids=["deep-array", "deep-object", "invalid-utf8", "truncated", "empty"],
)
def test_unparseable_bodies_are_400(client: TestClient, body: bytes, fragment: str) -> None:
    for path in ("/v1/chat/completions", "/edits"):
        assert fragment in assert_clear_4xx(raw(client, path, body), 400)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": "NaN"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"top_p": 0}, "top_p"),
        ({"n": 1000}, "n"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_chat_parameters_are_400(client: TestClient, extra: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert_clear_4xx(r, 400)
    assert (r.json()["error"]["param"] or "").startswith(param)


def test_bad_edit_bodies_change_nothing(client: TestClient) -> None:
    before = weights_hash(client)
    for body in (
        {**EDIT, "hparams": {"scale": float("inf")}},
        {**EDIT, "requests": [{**EDIT["requests"][0], "prompt": {"nested": ["x"]}}]},
        {**EDIT, "requests": [{**EDIT["requests"][0], "subject": "Louvre"}]},
        {**EDIT, "method": "../../etc/passwd"},
    ):
        r = client.post("/edits", content=json.dumps(body).replace("Infinity", "1e999"))
        assert 400 <= r.status_code < 500, r.text
    assert weights_hash(client) == before
    assert client.get("/edits").json()["data"] == []


def test_targets_too_long_for_the_limit_or_the_context_are_400(client: TestClient) -> None:
    before = weights_hash(client)
    request = EDIT["requests"][0]
    long_target = {**EDIT, "requests": [{**request, "target_new": "x" * 200}]}
    message = assert_clear_4xx(client.post("/edits", json=long_target), 400)
    assert "the most is 128" in message
    # One byte per token and a 128-token context: a 100-token target fits the limit, not the model.
    no_room = {**EDIT, "requests": [{**request, "target_new": "x" * 99}]}
    message = assert_clear_4xx(client.post("/edits", json=no_room), 400)
    assert "do not fit the model's 128-token context" in message
    assert weights_hash(client) == before
    assert client.get("/edits").json()["data"] == []


def test_edit_and_inference_keys_are_separate(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    install_shift(monkeypatch)
    with make_client(tmp_path, api_key=USER, admin_key=ADMIN) as c:
        as_user = {"authorization": f"Bearer {USER}"}
        as_admin = {"authorization": f"Bearer {ADMIN}"}
        assert c.post("/v1/chat/completions", json=CHAT, headers=as_user).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT, headers=as_admin).status_code == 401
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert c.post("/edits", json=EDIT, headers=as_user).status_code == 401
        assert c.post("/edits", json=EDIT).status_code == 401
        assert c.get("/edits", headers=as_user).status_code == 401
        assert c.post("/edits", json=EDIT, headers=as_admin).status_code == 200


def test_without_an_admin_key_only_loopback_clients_may_edit(tmp_path: Path) -> None:
    app = build_test_app(tiny_model("llama"), tmp_path)
    with TestClient(app, client=("203.0.113.7", 5000)) as remote:
        message = assert_clear_4xx(remote.post("/edits", json=EDIT), 403)
        assert "EDITSERVE_ADMIN_KEY" in message
    with TestClient(app, client=("127.0.0.1", 5000)) as local:
        assert local.get("/edits").status_code == 200


def test_edit_routes_are_rate_limited_per_key(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    install_shift(monkeypatch)
    with make_client(tmp_path, admin_key=ADMIN, edit_rate_per_minute=3) as c:
        headers = {"authorization": f"Bearer {ADMIN}"}
        codes = [c.post("/edits", json=EDIT, headers=headers).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.delete("/edits/edit-whatever", headers=headers)
        assert "retry in" in assert_clear_4xx(r, 429) and int(r.headers["retry-after"]) >= 1
        assert c.get("/edits", headers=headers).status_code == 200  # reading is not limited
        # Another caller has its own budget (a wrong key is refused by auth, not by the limit).
        assert c.post("/edits", json=EDIT, headers={"authorization": "Bearer x"}).status_code == 401


def test_the_rate_limiter_refills_over_time() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=2, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(30.0)
    assert limiter.take("b") == 0.0
    now[0] = 30.0
    assert limiter.take("a") == 0.0


def test_model_and_corpus_paths_stay_inside_the_allowed_folders(tmp_path: Path) -> None:
    inside = tmp_path / "models" / "m"
    inside.mkdir(parents=True)
    (tmp_path / "escape").symlink_to("/etc")
    Settings(allowed_dirs=[tmp_path / "models"], model=str(inside))
    for model in (str(tmp_path / "models" / ".." / "elsewhere"), "/etc", str(tmp_path / "escape")):
        with pytest.raises(ValueError, match="outside the allowed folders"):
            Settings(allowed_dirs=[tmp_path / "models"], model=model)
    link = tmp_path / "models" / "corpus.txt"
    link.symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match="stats_corpus"):
        Settings(allowed_dirs=[tmp_path / "models"], stats_corpus=link)
    with pytest.raises(ValueError, match="serac_scope"):
        Settings(allowed_dirs=[tmp_path / "models"], serac_scope="/etc/hostname")


def test_persisted_state_is_safetensors_json_and_sqlite_only(
    client: TestClient, tmp_path: Path
) -> None:
    assert client.post("/edits", json=EDIT).status_code == 200
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in {".safetensors", ".json", ".sqlite3"} or path.name.startswith(
            "journal.sqlite3-"
        ), path
        head = path.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), f"pickle: {path}"


def test_no_code_path_unpickles() -> None:
    """Persisted state is read with safetensors and json only: nothing that can run code."""
    root = Path(__file__).resolve().parents[2]
    forbidden = ("import pickle", "torch.load(", "allow_pickle=True", "import joblib", "dill")
    for package in ("editserve", "methods", "memory"):
        for source in (root / package).rglob("*.py"):
            text = source.read_text()
            assert not [f for f in forbidden if f in text], source
