"""Hot routes answered below FastAPI's routing (`NORMSERVE_RAW_ROUTES`, on by default).

A 32x32 /classify request costs the model well under a millisecond of one core, and on this
2-core machine the event loop's share of a request decides the throughput at high concurrency.
FastAPI's path to an endpoint — its inner middleware, the route scan, dependency solving and a
response model — is a large share of that (README, "A leaner /classify path": a FastAPI route
with an UploadFile, two dependencies and a response model answers 3,600 req/s under the same
load where a bare ASGI app answers 22,000). `RawRoutes` answers the routes it
is given itself: it is the innermost of normserve's middleware, so request ids, the access log,
metrics, draining and the body limit see these requests exactly as any other, and everything it
does not own (other paths, other methods, so a GET still gets FastAPI's 405) goes to FastAPI.

Each endpoint is an `async (Request) -> Response` that does the route's own checks (API key,
body, query model) in the FastAPI route's order; the FastAPI route of the same path stays
declared, so OpenAPI documents it and it answers when the setting is off. Domain and validation
errors map through the same functions as FastAPI's handlers (errors.py); anything else propagates
to the same 500 handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from normserve.service.errors import (
    NormserveError,
    disconnected_response,
    domain_error_response,
    validation_error_response,
)

Endpoint = Callable[[Request], Awaitable[Response]]


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


class RawRoutes:
    """Answers `POST <path>` for each path in `endpoints`; passes every other request on. Each
    path must be declared as a POST route of `router` (checked here, at start-up)."""

    def __init__(self, app: ASGIApp, router: APIRouter, endpoints: dict[str, Endpoint]) -> None:
        self.app = app
        self.endpoints: dict[str, tuple[BaseRoute, Endpoint]] = {}
        for path, endpoint in endpoints.items():
            route = next((r for r in router.routes if isinstance(r, APIRoute) and r.path == path), None)
            if route is None or "POST" not in (route.methods or set()):
                raise ValueError(f"raw route POST {path} has no FastAPI route declaring it")
            self.endpoints[path] = (route, endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owned = (
            self.endpoints.get(_route_path(scope)) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        if owned is None:
            await self.app(scope, receive, send)
            return
        route, endpoint = owned
        scope["route"] = route  # the metrics and the access log label requests by their route's template
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except NormserveError as exc:
            response = domain_error_response(request, exc)
        except RequestValidationError as exc:
            response = validation_error_response(exc)
        except ClientDisconnect:
            response = disconnected_response(request)
        await response(scope, receive, send)
