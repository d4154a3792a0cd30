"""Dependencies for routes: the server's state (state.py), its settings and its repository."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from normserve.service.repository import ModelRepository
from normserve.service.settings import Settings
from normserve.service.state import ServerState, request_state


# async: a plain `def` dependency costs a threadpool hop per request for an attribute read.
async def get_state(request: HTTPConnection) -> ServerState:
    return request_state(request)


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_settings_dep(request: HTTPConnection) -> Settings:
    return request_state(request).settings


async def get_repository(request: HTTPConnection) -> ModelRepository:
    return request_state(request).repository


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
