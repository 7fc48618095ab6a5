"""The real-time gateway: y-websocket clients on /v1/orgs/{org}/docs/{doc}, durable before broadcast."""

from canvasdb.gateway.hub import Hub

__all__ = ["Hub"]
