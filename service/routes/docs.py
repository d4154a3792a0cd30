"""`/docs` (Swagger UI) and `/redoc` (ReDoc) that work without internet access.

FastAPI's own pages load their JavaScript and CSS from a CDN, so in an air-gapped cluster `/docs`
is a blank page. These are FastAPI's self-hosting recipe: the same HTML (`get_swagger_ui_html`,
`get_redoc_html`) pointing at copies of the assets that the `fastapi-offline` package ships,
served from this server under `/docs-assets/`. ReDoc's Google Fonts are left out too.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from normserve.service.errors import NormserveError

router = APIRouter(include_in_schema=False)

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(str(files("fastapi_offline").joinpath("static")))
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


class DocsAssetNotFound(NormserveError):
    status_code = 404


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=request.app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
    # ReDoc's "API docs by Redocly" footer loads its logo from Redocly's CDN: images from this
    # server only, so the page never reaches out (the logo is decoration; the link stays).
    page.headers["Content-Security-Policy"] = "img-src 'self' data:"
    return page


@router.get(ASSETS_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    """One of the four files of the docs pages; nothing else."""
    if name not in ASSETS:
        raise DocsAssetNotFound(f"no docs asset {name!r}")
    return FileResponse(ASSETS_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
