"""Python SDK for the PeerAiD robustification service (REST API under /v1)."""

__version__ = "0.1.0"

from .client import Client, parse_sse
from .config import Settings, config_path, resolve_settings
from .errors import (
    AuthenticationError,
    ChecksumMismatch,
    ConfigError,
    Conflict,
    ConnectionFailed,
    NotFound,
    PayloadTooLarge,
    PeeraidError,
    RateLimited,
    ServerError,
    ValidationError,
)

__all__ = [
    "AuthenticationError",
    "ChecksumMismatch",
    "Client",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "NotFound",
    "PayloadTooLarge",
    "PeeraidError",
    "RateLimited",
    "ServerError",
    "Settings",
    "ValidationError",
    "__version__",
    "config_path",
    "parse_sse",
    "resolve_settings",
]
