"""Python SDK for the PeerAiD robustification service (REST API under /v1)."""

__version__ = "0.1.0"

from .client import Client, parse_sse  # noqa: E402  (after __version__, which client.py reads)
from .config import Settings, config_path, resolve_settings  # noqa: E402
from .errors import (  # noqa: E402
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
    "AuthenticationError", "ChecksumMismatch", "Client", "ConfigError", "Conflict", "ConnectionFailed", "NotFound",
    "PayloadTooLarge", "PeeraidError", "RateLimited", "ServerError", "Settings", "ValidationError", "__version__",
    "config_path", "parse_sse", "resolve_settings",
]
