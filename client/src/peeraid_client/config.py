"""Where the service is and which key to use: argument, else environment, else config file, else default.

The config file is `$PEERAID_CONFIG`, or `~/.config/peeraid/config.toml` (`$XDG_CONFIG_HOME` honoured):

    url = "https://peeraid.example.com"
    api_key = "pk_..."
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None


def config_path() -> Path:
    explicit = os.environ.get("PEERAID_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "peeraid" / "config.toml"


def read_config_file(path: Path | None = None) -> dict[str, Any]:
    """The file's settings; {} when the default file does not exist (a named one must)."""
    explicit = path is not None or bool(os.environ.get("PEERAID_CONFIG"))
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: {err}") from None
    for key in ("url", "api_key"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"config file {path}: {key} must be a string")
    return data


def resolve_settings(url: str | None = None, api_key: str | None = None) -> Settings:
    file: dict[str, Any] | None = None

    def from_file(key: str) -> str | None:
        nonlocal file
        if file is None:
            file = read_config_file()
        return file.get(key)

    url = url or os.environ.get("PEERAID_URL") or from_file("url") or DEFAULT_URL
    api_key = api_key or os.environ.get("PEERAID_API_KEY") or from_file("api_key")
    if "://" not in url:
        url = f"http://{url}"
    # the API's own paths start with /v1; a URL copied with it still works
    return Settings(url=url.rstrip("/").removesuffix("/v1"), api_key=api_key or None)
