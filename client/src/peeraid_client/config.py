"""Where the service is and which key to use: argument, else environment, else config file, else default.

The config file is `$PEERAID_CONFIG`, or `~/.config/peeraid/config.toml` (`$XDG_CONFIG_HOME` honoured):

    url = "https://peeraid.example.com"
    api_key = "pk_..."

A key is stripped of surrounding whitespace wherever it comes from (a copied line, `$(cat key)`, a newline
in the file), and never shown whole: messages name it by its prefix (`pk_0123456789ab_…`) at most.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
SENDABLE = re.compile(r"[\x21-\x7e]+")  # what an HTTP header carries as is: printable ASCII, no spaces


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    api_key_source: str | None = None  # "argument", "PEERAID_API_KEY" or "config file <path>"


def key_hint(key: str) -> str:
    """How a key is shown: its public prefix at most (`pk_0123456789ab_…`), never its secret."""
    parts = key.split("_", 2)
    if len(parts) == 3 and parts[0] == "pk" and re.fullmatch(r"[0-9A-Za-z]{1,16}", parts[1]):
        return f"pk_{parts[1]}_…"
    return "a key not of the form pk_<prefix>_<secret>"


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

    url = _clean(url) or _clean(os.environ.get("PEERAID_URL")) or _clean(from_file("url")) or DEFAULT_URL
    key, source = None, None
    for candidate, where in (
        (lambda: api_key, "argument"),
        (lambda: os.environ.get("PEERAID_API_KEY"), "PEERAID_API_KEY"),
        (lambda: from_file("api_key"), f"config file {config_path()}"),
    ):
        key = _clean(candidate())
        if key:
            source = where
            break
    if key is not None and not SENDABLE.fullmatch(key):
        raise ConfigError(
            f"the API key from {source} ({key_hint(key)}) has a space, a control or a non-ASCII character inside it: "
            "copy it again (a key is pk_<prefix>_<secret>, in letters, digits, '_' and '-')"
        )
    if "://" not in url:
        url = f"http://{url}"
    # the API's own paths start with /v1; a URL copied with it still works
    return Settings(url=url.rstrip("/").removesuffix("/v1"), api_key=key, api_key_source=source)


def _clean(value: str | None) -> str | None:
    """A setting without the whitespace around it; blank is unset."""
    return value.strip() or None if value else None
