"""The optional API key: `require_api_key`, a dependency on the routers that run a model.

With `NORMSERVE_API_KEY` set, those routes need `Authorization: Bearer <key>`; without it they
are open. Health, readiness, model metadata, metrics, the OpenAPI docs and the demo page are
always open: probes and scrapers need no secret, and metadata (names, shapes, labels, provider)
describes the interface rather than running anything. The key is compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from normserve.service.deps import SettingsDep
from normserve.service.errors import Unauthorized
from normserve.service.state import request_state

# auto_error=False: the scheme only reads the header and documents it in OpenAPI; the answer to
# a missing or wrong key is our own 401 with a JSON body (FastAPI's would be a 403/401 `detail`).
bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>` when the server has NORMSERVE_API_KEY set",
)


async def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if settings.api_key is None:
        return
    if credentials is None:
        raise Unauthorized("this route needs an API key: send the header 'Authorization: Bearer <key>'")
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized("wrong API key", invalid_token=True)


ApiKey = Depends(require_api_key)


async def check_api_key(request: Request) -> None:
    """`require_api_key` for a route answered without FastAPI's dependency solving."""
    await require_api_key(request_state(request).settings, await bearer(request))
