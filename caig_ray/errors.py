"""The errors a user can fix: bad config, bad data, a model folder that cannot load, an output in use.
Every entry point catches ``CaigError`` and prints its message -- which names the file, key, row or
flag -- as one line on stderr, exit code 2; never a stack trace. This module imports nothing heavy,
so an entry point's ``--help`` does not load torch to know its errors."""

from __future__ import annotations


class CaigError(Exception):
    """Base of every user-fixable error."""


class ModelFolderError(CaigError, FileNotFoundError):
    """A model folder that cannot be used; the message names the setting, the path and what is missing."""
