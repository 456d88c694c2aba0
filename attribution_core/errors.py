"""Named errors of the project, core and pipelines alike: every failure raised on purpose is one
of these, so the command line answers each with one line and exit code 2, and the endpoint
with a 4xx status.

Each subclasses the builtin a caller would otherwise expect (``ValueError`` for bad input,
``RuntimeError`` for a state problem), so generic handlers still work, while callers that
care can catch the precise kind. Messages say what was expected, what was found and which
setting or input to change.
"""

from __future__ import annotations

import datetime
import time
from typing import Any


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


class UnknownWordsError(InputError):
    """A prompt holds words the model's tokenizer never saw as whole words."""


class ImageDecodeError(InputError):
    """An image could not be decoded or is unusable; the message names the example."""


class ImageShapeError(ImageDecodeError):
    """An image decoded but its size or aspect ratio is outside what was allowed."""


class QuarantineError(InputError):
    """An index build quarantined more than ``index.max_quarantine_fraction`` of its examples."""


class EmptyIndexError(InputError):
    """An index version holds no rows: every example was quarantined, or the dataset was empty."""


class MissingWeightsError(AttributionError):
    """Aspects were asked for that this index version has no learned weights for."""

    def __init__(self, message: str, aspects: list[str]) -> None:
        super().__init__(message)
        self.aspects = aspects


class RequestError(AttributionError):
    """A request the endpoint refuses: ``status`` is the HTTP code, ``detail`` what to fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class IncompleteBuildError(AttributionError, RuntimeError):
    """A build ended without every example either featurized or quarantined exactly once."""


class EndpointTimeoutError(AttributionError, TimeoutError):
    """The endpoint named by ``reindex.endpoint`` did not start answering from the new version."""


class LeaseHeldError(AttributionError):
    """Another run holds the lease and it has not expired."""

    def __init__(self, uri: str, holder: dict[str, Any]) -> None:
        self.holder = holder
        left = holder.get("expires_at", 0) - time.time()
        since = datetime.datetime.fromtimestamp(holder.get("acquired_at", 0), datetime.timezone.utc)
        super().__init__(f"{uri} is held by {holder.get('owner')} on {holder.get('host')} (pid {holder.get('pid')}) "
                         f"since {since.isoformat(timespec='seconds')}, for {max(0, left):.0f} s more; another run "
                         "is doing this work. Wait for it, or delete the lease object if that run is known to be dead.")


class LeaseLostError(AttributionError):
    """The lease was taken over (it expired) while this run believed it held it."""
