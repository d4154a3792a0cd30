"""The web demo: `GET /` serves one static page; `GET /static/...` its script, style and samples.

The files ship inside the package (`service/static/`, package data), so the page works from an
installed wheel as from the source tree. No build step and nothing from a CDN: the page talks
to the same JSON/PNG routes as any other client (/classify, /features, /reconstruct, /v2/...).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from normserve.service.deps import StateDep
from normserve.service.errors import NormserveError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(str(files("normserve.service").joinpath("static"))).resolve()
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
# Same-origin only: the page loads nothing from elsewhere and talks only to this server.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


class StaticNotFound(NormserveError):
    status_code = 404


def _file(path: Path) -> FileResponse:
    headers = dict(_HEADERS)
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = _CSP
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=headers)


@router.get("/")
async def index() -> FileResponse:
    """The demo page."""
    return _file(STATIC_DIR / "index.html")


@router.get("/ui/routes")
async def served_routes(server: StateDep) -> dict[str, dict[str, object]]:
    """Which model each image route runs and whether it is served here, so the page shows a panel
    only for what works (a repository may hold only a classifier, or only a denoiser)."""
    settings, repository = server.settings, server.repository

    def entry(name: str, task: str, routes: list[str]) -> dict[str, object]:
        versions = repository.models.get(name) or {}
        served = any(m.ready and m.config is not None and m.config.task == task for m in versions.values())
        return {"model": name, "served": served, "routes": routes}

    return {
        "classifier": entry(settings.classifier, "classification", ["/classify", "/features"]),
        "denoiser": entry(settings.denoiser, "denoising", ["/reconstruct"]),
    }


@router.get("/static/{name:path}")
async def static(name: str) -> FileResponse:
    """One of the page's files; nothing outside `service/static/` and only known file types."""
    if "\x00" in name:  # Path.resolve() raises on a NUL (GET /static/a%00.js)
        raise StaticNotFound(f"no static file {name!r}")
    path = (STATIC_DIR / name).resolve()
    if not path.is_relative_to(STATIC_DIR) or path.suffix not in _TYPES or not path.is_file():
        raise StaticNotFound(f"no static file {name!r}")
    return _file(path)
