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

normserve answers `POST /classify` and V2 infer this way (app.py). A path may have parameters
(`/v2/models/{name}/infer`): they are matched by the FastAPI route's own compiled pattern and
convertors, so they match what FastAPI's routing would, and land in `request.path_params`.

Each endpoint is an `async (Request) -> Response` that does the route's own checks (API key,
body, query model) in the FastAPI route's order; the FastAPI route of the same path stays
declared, so OpenAPI documents it and it answers when the setting is off. Domain and validation
errors map through the same functions as FastAPI's handlers (errors.py); anything else propagates
to the same 500 handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

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
    path must be declared as a POST route of one of `routers` (checked here, at start-up)."""

    def __init__(self, app: ASGIApp, routers: Sequence[APIRouter], endpoints: Mapping[str, Endpoint]) -> None:
        self.app = app
        self.endpoints: dict[str, tuple[BaseRoute, Endpoint]] = {}  # fixed paths
        self.templates: list[tuple[APIRoute, Endpoint]] = []  # paths with parameters
        routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
        for path, endpoint in endpoints.items():
            route = next((r for r in routes if r.path == path and "POST" in (r.methods or set())), None)
            if route is None:
                raise ValueError(f"raw route POST {path} has no FastAPI route declaring it")
            if route.param_convertors:
                self.templates.append((route, endpoint))
            else:
                self.endpoints[path] = (route, endpoint)

    def _match(self, path: str, scope: Scope) -> tuple[BaseRoute, Endpoint] | None:
        owned = self.endpoints.get(path)
        if owned is not None:
            return owned
        for route, endpoint in self.templates:
            match = route.path_regex.match(path)
            if match is not None:
                convert = route.param_convertors
                scope["path_params"] = {k: convert[k].convert(v) for k, v in match.groupdict().items()}
                return route, endpoint
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owned = (
            self._match(_route_path(scope), scope) if scope["type"] == "http" and scope["method"] == "POST" else None
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
