"""One frozen settings object, read from ``CANVASDB_*`` environment variables once.

Library code never reads the environment itself: the CLI and the server build a
``Settings`` and pass its values down as keyword arguments.
"""

from __future__ import annotations

import difflib
import resource
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _most_gateway_connections() -> int:
    """Three quarters of the file descriptors this process may open (RLIMIT_NOFILE, its soft
    limit, ``ulimit -n``): each WebSocket holds one for as long as it is open, and the rest
    is left for HTTP clients, the database pool, the listening socket, logs and blobs."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 3 // 4


_PG_INT_MAX = 2**31 - 1  # PostgreSQL's largest statement_timeout (ms)
CENTURY_S = 100 * 365 * 86400  # longer periods overflow date arithmetic; none is meant
SECRET = frozenset({"database_url", "s3_secret_access_key", "embedder_api_key"})  # values never shown
# CANVASDB_* variables that are not settings: the test suite's own
NOT_SETTINGS = frozenset({"CANVASDB_TEST_DATABASE_URL", "CANVASDB_JS_CACHE"})


class Settings(BaseSettings):
    """Every knob of canvasdb, with its default. See the README's settings table."""

    # An empty variable counts as unset (CANVASDB_BLOBS_DIR= meant the current folder); infinity
    # and NaN are no durations or sizes (an infinite grace period failed only in the daily sweep).
    model_config = SettingsConfigDict(env_prefix="CANVASDB_", frozen=True, extra="ignore",
                                      env_ignore_empty=True, allow_inf_nan=False)

    home: Path = Field(default=Path(".canvasdb"), description="Folder for embedded data and secrets")
    database_url: str | None = Field(default=None, description="External PostgreSQL; unset = embedded")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_data_bytes: int = Field(default=1024 * 1024, ge=1024, description="Largest entity `data`")
    keyframe_interval: int = Field(default=20, ge=1, le=10_000, description="Full copy every K versions")
    http_header_timeout_seconds: float = Field(default=10, gt=0, description="A request's headers must "
                                               "arrive within this time (else 408 and closed)")
    http_idle_timeout_seconds: float = Field(default=60, gt=0, description="A request body, or a "
                                             "response being sent, may stall this long at most")
    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=20, ge=1)
    statement_timeout_ms: int = Field(default=10_000, ge=0, le=_PG_INT_MAX)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        default="info", description="Server log level")
    group_commit_window_ms: float = Field(default=0.0, ge=0, le=1000,
                                          description="How long the op log waits to batch appends")
    group_commit_max_batch: int = Field(default=1000, ge=1, description="Most updates in one commit")
    doc_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0, description="Loaded documents, bytes")
    max_update_bytes: int = Field(default=1024 * 1024, ge=1024, description="Largest Yjs update")
    gateway_max_updates_per_s: float = Field(default=500, gt=0, description="Per connection, sustained")
    gateway_update_burst: int = Field(default=1000, ge=1, description="Per connection, burst allowance")
    gateway_rate_grace_s: float = Field(default=10, ge=0, description="A connection over the rate is "
                                        "slowed down; one that stays over it this long is closed (4429)")
    gateway_idle_seconds: float = Field(default=30, ge=0, description="Unload a document this long "
                                        "after its last client left")
    gateway_reauth_seconds: float = Field(default=30, gt=0, description="An open connection's token "
                                          "and access are checked again this often (revoked: closed)")
    gateway_awareness_delay_ms: float = Field(default=50, ge=0, le=1000, description="Awareness (cursors, "
                                              "presence) is relayed per document at most this often, "
                                              "each client's latest state in one message")
    gateway_max_connections_per_user: int = Field(default=100, ge=1, description="Open gateway "
                                                  "connections of one user in one process (more: 1013)")
    gateway_max_connections: int = Field(default_factory=_most_gateway_connections, ge=1,
                                         description="Open gateway connections of one process (more: "
                                         "1013); default three quarters of its open-file limit")
    compact_after_updates: int = Field(default=1000, ge=1, description="Compact early after N updates")
    compact_after_bytes: int = Field(default=1024 * 1024, ge=1, description="... or after N bytes")
    update_retention_hours: float = Field(default=24, gt=0, le=CENTURY_S / 3600,
                                          description="Keep updates (time travel)")
    snapshot_retention_days: float = Field(default=30, gt=0, le=CENTURY_S / 86400,
                                           description="Keep hourly snapshots")
    snapshot_inline_bytes: int = Field(default=1024 * 1024, ge=0,
                                       description="Larger snapshots go to the blob store")
    blob_backend: Literal["filesystem", "s3"] = Field(
        default="filesystem", description="Where blobs (attachments, large snapshots) are kept")
    blobs_dir: Path | None = Field(default=None, description="Folder of the filesystem backend; unset = "
                                                             "<home>/blobs")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; unset = AWS")
    s3_bucket: str | None = Field(default=None, description="S3 bucket (must exist); required for s3")
    s3_access_key_id: str | None = Field(default=None, description="S3 key id; unset = boto3's chain")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key")
    s3_region: str = Field(default="us-east-1", description="S3 region (MinIO accepts the default)")
    max_attachment_bytes: int = Field(default=100 * 1024 * 1024, ge=1,
                                      description="Largest attachment upload")
    blob_orphan_grace_s: float = Field(default=24 * 3600, ge=0, le=CENTURY_S, description="The orphan "
                                       "sweep leaves content written more recently alone: longer than "
                                       "any upload and its commit take")
    embedder: Literal["local", "ollama", "openai"] = Field(
        default="local", description="What turns text into vectors for semantic search")
    embedder_model: str | None = Field(default=None, description="Model; unset = the kind's default")
    embedder_url: str | None = Field(default=None, description="Base url of the ollama or openai service")
    embedder_api_key: SecretStr | None = Field(default=None, description="Bearer key sent to that service")
    embedder_timeout_s: float = Field(default=30, gt=0, description="Longest wait for a batch of vectors")
    search_embed_timeout_ms: float = Field(default=2000, gt=0, description="Longest wait for a query's "
                                           "vector; beyond it search is text-only (degraded)")
    search_rank_cutoff: int = Field(default=2000, ge=20, description="Most text matches ranked per bucket "
                                    "(Meilisearch-like cutoff that bounds broad queries)")
    search_facet_cap: int = Field(default=1000, ge=100, description="Most matches counted for totals "
                                  "and facets when facets are asked; beyond, they are marked approximate")
    search_total_cap: int = Field(default=1000, ge=100, description="Most matches counted for the total "
                                  "when no facets are asked (as Meilisearch's maxTotalHits); beyond, "
                                  "it is marked approximate")
    search_exact_below: int = Field(default=10_000, ge=0, description="An org with fewer vectors is "
                                    "searched exactly (no HNSW)")
    search_ef_search: int = Field(default=100, ge=10, le=1000, description="HNSW candidate list size")

    @field_validator("database_url")
    @classmethod
    def _libpq_reads_it(cls, value: str | None) -> str | None:
        """Refused here, not as a traceback where the first connection is made. libpq's own
        message is left out: it quotes the string, password and all."""
        if value is not None:
            try:
                conninfo_to_dict(value)
            except psycopg.Error:
                raise ValueError("not a connection string PostgreSQL reads: postgresql://user:password@"
                                 "host:port/database, or key=value pairs (host=... dbname=...)") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _pool_sizes(self) -> Settings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(f"CANVASDB_POOL_MIN_SIZE ({self.pool_min_size}) is more than "
                             f"CANVASDB_POOL_MAX_SIZE ({self.pool_max_size})")
        return self

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def pgdata(self) -> Path:
        return self.home_dir / "pgdata"

    @property
    def token_file(self) -> Path:
        return self.home_dir / "admin-token"

    @property
    def blobs_path(self) -> Path:
        return self.blobs_dir.expanduser().resolve() if self.blobs_dir else self.home_dir / "blobs"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``CANVASDB_*`` variable that names no setting (a misspelt name is
    otherwise ignored without a word), with the setting it was likely meant to be."""
    known = {name.upper() for name in Settings.model_fields}
    warnings = []
    for name in sorted(environ):
        upper = name.upper()  # (names are read in any case)
        if not upper.startswith("CANVASDB_") or upper in NOT_SETTINGS:
            continue
        setting = upper.removeprefix("CANVASDB_")
        if setting not in known:
            close = difflib.get_close_matches(setting, known, n=1, cutoff=0.7)
            meant = f" (did you mean CANVASDB_{close[0]}?)" if close else ""
            warnings.append(f"{name} is not a canvasdb setting{meant}; it is ignored")
    return warnings
