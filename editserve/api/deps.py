"""Shared route dependencies: the app's state and the API key check."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from editserve.api.errors import APIError
from editserve.api.limits import RateLimiter
from editserve.api.serving import OpenAIServing
from editserve.config import Settings
from editserve.edits.service import EditService
from editserve.engine.transformers_engine import TransformersEngine
from editserve.metrics import ServerMetrics


@dataclass
class AppState:
    settings: Settings
    engine: TransformersEngine
    metrics: ServerMetrics
    serving: OpenAIServing
    edits: EditService
    edit_rate: RateLimiter | None = None  # None: no limit


def get_state(request: Request) -> AppState:
    return request.app.state.editserve


StateDep = Annotated[AppState, Depends(get_state)]

# Headers a proxy adds on behalf of the client it forwards (lower case, as starlette's).
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_api_key(request: Request, state: StateDep) -> None:
    """Inference routes: open when no EDITSERVE_API_KEY is set, else the key as a Bearer token."""
    expected = state.settings.api_key
    if expected is None:
        return
    given = _bearer(request)
    if given is None or not secrets.compare_digest(given, expected.get_secret_value()):
        raise APIError(
            401,
            "invalid or missing API key: send it as the header 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )


def require_admin(request: Request, state: StateDep) -> None:
    """Edit routes: the admin key as a Bearer token; with none configured, loopback clients only."""
    expected = state.settings.admin_key
    if expected is None:
        host = request.client.host if request.client else ""
        if not _is_loopback(host):
            raise APIError(
                403,
                "edits are open to loopback clients only while EDITSERVE_ADMIN_KEY is unset",
                type="permission_error",
            )
        # A loopback peer that forwards for someone (a same-host proxy) hides who the client is.
        # With trusted proxies configured, uvicorn has put X-Forwarded-For's client in
        # `request.client` already; otherwise the request cannot prove it is local.
        forwarded = [h for h in PROXY_HEADERS if h in request.headers]
        trusted = state.settings.forwarded_allow_ips.strip() and "x-forwarded-for" in forwarded
        if forwarded and not trusted:
            raise APIError(
                403,
                f"this request came through a proxy ({forwarded[0]}), so it is not known to be "
                "a loopback client: set EDITSERVE_ADMIN_KEY (or EDITSERVE_FORWARDED_ALLOW_IPS "
                "to the proxy's address, with the proxy sending X-Forwarded-For)",
                type="permission_error",
            )
        return
    given = _bearer(request)
    if given is None or not secrets.compare_digest(given, expected.get_secret_value()):
        raise APIError(
            401,
            "edits need the admin key: send 'Authorization: Bearer <EDITSERVE_ADMIN_KEY>'",
            type="authentication_error",
            code="invalid_admin_key",
        )


def _is_loopback(host: str) -> bool:
    """Only an address is loopback: the client host is a peer address or, from trusted proxies,
    X-Forwarded-For's (which might say anything, as "localhost")."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limit_edit_rate(request: Request, state: StateDep) -> None:
    """Edits are expensive (seconds of compute each): a per-key budget keeps one client from
    starving the others, or the server."""
    if state.edit_rate is not None:
        state.edit_rate.check(request)
