"""canvasdb: database-first persistence for a collaborative whiteboard platform."""

from canvasdb.errors import CanvasdbError

__all__ = ["CanvasdbError", "__version__"]
__version__ = "0.1.0"
