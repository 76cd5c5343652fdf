"""The clients' user-facing errors: ValueErrors whose message names the problem, the value and the fix."""
from __future__ import annotations

__all__ = ["ClientError", "DataError"]


class ClientError(ValueError):
    """A client was given a bad option, device or checkpoint; the message says the fix."""


class DataError(ClientError):
    """A case on disk is missing, corrupt or inconsistent; the message names the file and the fix."""
