"""Errors a user can cause. The CLI prints these as one line and exits non-zero, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user (config, data, URI, missing server or weights): one clear sentence."""

    exit_code = 1
    # Infrastructure faults (an unreachable server) may succeed on retry; a bad config never will.
    transient = False

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ConfigError(UserError):
    """A config file or override is invalid. Message format: `FILE: a.b.c: what is wrong`."""

    exit_code = 2


class StorageError(UserError):
    """An artifact could not be read or written (missing object, unreachable server, bad key)."""


class ChecksumError(StorageError):
    """An object's bytes do not match the sha256 recorded when it was written."""


class IncompleteArtifactError(UserError):
    """A prefix has no manifest.json: its stage never finished, so it is not an input."""
