"""Property-based requests to every route of the OpenAPI schema (schemathesis): never a 5xx.

On a tiny random model in-process, so generated chat requests decode in milliseconds; bounded
(a few dozen examples per route) to keep CI short. Every request carries the admin key, so
generated edit bodies reach validation and the methods (schemathesis calls from the host
"testclient", which is no loopback address).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test dependency")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.python.asgi import get_client  # noqa: E402

from tests.conftest import build_test_app, tiny_model  # noqa: E402

# Built at import: schemathesis collects one test per route from the schema. A tiny model and a
# throwaway state folder, so it costs well under a second.
ADMIN = "fuzz-admin-key"
APP = build_test_app(
    tiny_model("llama", max_len=128),
    Path(tempfile.mkdtemp(prefix="fuzz-state-")),
    admin_key=ADMIN,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    # One client for the whole run: it runs the app's lifespan (the engine's thread) once.
    with get_client(APP) as c:
        yield c


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples every run: CI must not flake
    suppress_health_check=list(HealthCheck),
)
def test_no_route_answers_with_a_server_error(case, client) -> None:  # noqa: ANN001
    response = case.call(session=client, headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
