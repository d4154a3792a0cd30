"""`ServerState`: everything one worker process's lifespan (app.py) builds, in one typed object,
and how the rest of the service reaches it: `server_state(app)` / `request_state(request)`, or the
`StateDep` dependency in a route (deps.py). Imports no FastAPI: the CLI imports tracing.py, which
uses it, before it knows whether the server's packages import at all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    import anyio

    from normserve.service.budget import DecodeGate, MemoryBudget
    from normserve.service.grpc_server import GrpcServer
    from normserve.service.memory import MemoryTrimmer
    from normserve.service.metrics import Metrics
    from normserve.service.poller import RepositoryPoller
    from normserve.service.repository import ModelRepository
    from normserve.service.settings import Settings
    from normserve.service.shutdown import Drain
    from normserve.service.tracing import Tracing
    from normserve.service.workers import WorkerRoster


@dataclass(eq=False)
class ServerState:
    settings: Settings
    repository: ModelRepository  # the served versions, each with its sessions and batcher (model.py)
    metrics: Metrics
    drain: Drain  # set once the server starts shutting down (shutdown.py)
    budget: MemoryBudget  # this worker's memory budget (budget.py, governor.py)
    executor: ThreadPoolExecutor  # one inference thread per model instance
    workers: WorkerRoster  # readiness of this server's worker processes
    tracing: Tracing | None  # None: tracing off
    json_limiter: anyio.CapacityLimiter  # large V2 JSON parses and answers, one at a time (routes/v2.py)
    decode_gate: DecodeGate  # large image decodes, one at a time (budget.py)
    poller: RepositoryPoller | None = None
    trimmer: MemoryTrimmer | None = None
    grpc: GrpcServer | None = None  # None: NORMSERVE_GRPC off


STATE_KEY = "server"  # the app.state attribute that holds it


def server_state(app: Any) -> ServerState:
    """The running app's state (set by its lifespan)."""
    state: ServerState = getattr(app.state, STATE_KEY)
    return state


def request_state(request: HTTPConnection) -> ServerState:
    """The state of the app serving `request`: from the lifespan state the server copies into
    every request's scope (app.py yields it), else from the app."""
    state = request.scope.get("state")
    server: ServerState | None = state.get(STATE_KEY) if state else None
    return server if server is not None else server_state(request.app)
