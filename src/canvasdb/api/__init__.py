"""The HTTP API."""

from canvasdb.api.app import create_app

__all__ = ["create_app"]
