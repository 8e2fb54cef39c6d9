"""What the app holds while it runs, reachable from every request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar.connection import ASGIConnection

from gateway.accounting.metering import Metering, NoMetering
from gateway.serving.registry import ModelRegistry
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.accounting.services import Accounting

STATE_KEY = "gateway"

# Names under which a request carries its own values in ``scope["state"]``.
REQUEST_ID_SCOPE_KEY = "request_id"
"""The gateway's request id (``gateway.api.request_ids``)."""
API_KEY_SCOPE_KEY = "api_key"
"""The authenticated ``ApiKeyInfo`` (``gateway.api.auth``)."""
OBSERVED_MODEL_SCOPE_KEY = "observed_model"
"""The served model's name, set before admission so a refusal is counted under its model."""
OBSERVED_TICKET_SCOPE_KEY = "observed_ticket"
"""The admitted request's ticket; the request observer reads its outcome for the log line."""

AnyConnection = ASGIConnection[Any, Any, Any, Any]


@dataclass
class GatewayState:
    settings: Settings
    models: ModelRegistry
    metering: Metering = field(default_factory=NoMetering)
    ready: bool = False
    draining: bool = False
    _accounting: Accounting | None = None

    @property
    def accounting(self) -> Accounting:
        if self._accounting is None:
            raise RuntimeError("accounting is opened by the app's lifespan; the app has not started")
        return self._accounting

    @accounting.setter
    def accounting(self, value: Accounting) -> None:
        self._accounting = value


def gateway_state(connection: AnyConnection) -> GatewayState:
    state: GatewayState = connection.app.state[STATE_KEY]
    return state


def request_id(connection: AnyConnection) -> str:
    value: str = connection.scope["state"][REQUEST_ID_SCOPE_KEY]
    return value
