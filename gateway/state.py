"""What the app holds while it runs, reachable from every request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from litestar import Request

from gateway.metering import Metering, NoMetering
from gateway.models import ModelRegistry
from gateway.settings import Settings

STATE_KEY = "gateway"


@dataclass
class GatewayState:
    settings: Settings
    models: ModelRegistry
    metering: Metering = field(default_factory=NoMetering)
    ready: bool = False
    draining: bool = False


def gateway_state(request: Request[Any, Any, Any]) -> GatewayState:
    state: GatewayState = request.app.state[STATE_KEY]
    return state


def request_id(request: Request[Any, Any, Any]) -> str:
    value: str = request.scope["state"]["request_id"]
    return value
