"""The one error of importing a trained network: a file of the wrong kind or shape."""
from __future__ import annotations

from ..config import ConfigError


class PretrainedError(ConfigError):
    """A trained network's file that cannot be imported; the message names the file, layer and shapes.
    A ConfigError, so every splitnet command prints it as one line."""
