"""Failures of the database layer that callers handle by kind, whichever driver raised them."""

from __future__ import annotations


class DatabaseUnavailable(Exception):
    """The database could not be reached or would not take the connection (down, restarting, dropped, out
    of connections): worth retrying later. SQLAlchemy's own OperationalError says the same on its paths."""
