"""Errors a user can act on.

Every error protlm raises for bad input derives from :class:`ProtlmError`. The command-line tool prints
such errors as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ProtlmError(Exception):
    """Base class for errors caused by input, configuration or files rather than by protlm itself."""


class ConfigError(ProtlmError, ValueError):
    """A configuration key, value or preset is wrong."""


class CheckpointError(ProtlmError, ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


class InputError(ProtlmError, ValueError):
    """A sequence file or record is malformed (names the file, record and position where known)."""
