"""The usage dashboard: a static page served by the gateway, drawing what the usage API answers."""

from gateway.api.dashboard.routes import DASHBOARD_PATH, DASHBOARD_ROUTES

__all__ = ["DASHBOARD_PATH", "DASHBOARD_ROUTES"]
