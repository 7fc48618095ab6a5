"""One frozen settings object, read from ``CANVASDB_*`` environment variables once.

Library code never reads the environment itself: the CLI and the server build a
``Settings`` and pass its values down as keyword arguments.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of canvasdb, with its default. See the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="CANVASDB_", frozen=True, extra="ignore")

    home: Path = Field(default=Path(".canvasdb"), description="Folder for embedded data and secrets")
    database_url: str | None = Field(default=None, description="External PostgreSQL; unset = embedded")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_data_bytes: int = Field(default=1024 * 1024, ge=1024, description="Largest entity `data`")
    keyframe_interval: int = Field(default=20, ge=1, le=10_000, description="Full copy every K versions")
    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=20, ge=1)
    statement_timeout_ms: int = Field(default=10_000, ge=0)
    log_level: str = "info"
    group_commit_window_ms: float = Field(default=1.0, ge=0, le=1000,
                                          description="How long the op log waits to batch appends")
    group_commit_max_batch: int = Field(default=1000, ge=1, description="Most updates in one commit")
    doc_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0, description="Loaded documents, bytes")
    max_update_bytes: int = Field(default=1024 * 1024, ge=1024, description="Largest Yjs update")

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def pgdata(self) -> Path:
        return self.home_dir / "pgdata"

    @property
    def token_file(self) -> Path:
        return self.home_dir / "admin-token"
