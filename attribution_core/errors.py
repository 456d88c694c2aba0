"""Named errors of the attribution core.

Each subclasses the builtin a caller would otherwise expect (``ValueError`` for bad input,
``RuntimeError`` for a state problem), so generic handlers still work, while callers that
care can catch the precise kind. Messages say what was expected, what was found and which
setting or input to change.
"""

from __future__ import annotations


class AttributionError(Exception):
    """Base class of every error raised on purpose by this project."""


class ConfigError(AttributionError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InputError(AttributionError, ValueError):
    """A batch handed to the featurizer or scorer cannot be used as it is."""


class ModelLoadError(AttributionError, ValueError):
    """A model directory does not hold a loadable diffusers model in a known layout."""


class ManifestMismatchError(AttributionError, RuntimeError):
    """Two artifacts that must agree (index, weights, query features) do not."""
