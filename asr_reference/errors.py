"""Errors a user can fix. The command line prints them as one line (``path[:line]: what is wrong``) and
exits with status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class ASRError(Exception):
    """A bad input (file, manifest line, checkpoint, option); the message names where it is."""


class ManifestError(ASRError, ValueError):
    """A manifest line that cannot be used; the message names the file and line."""


class AudioError(ASRError, ValueError):
    """An audio file that cannot be read; the message names the file (and manifest line when known)."""


class CheckpointError(ASRError):
    """A run folder or checkpoint that cannot be used; the message names the file."""


class ModelLoadError(ASRError):
    """A pretrained encoder or LLM folder that cannot be loaded; the message names the folder."""
