"""The user's errors raised inside Ray workers reach the driver as themselves: the same class
and one-line message, without retries that cannot succeed."""

from __future__ import annotations

import numpy as np
import pytest

from attribution_core.errors import AttributionError, InputError, ManifestMismatchError
from pipelines.failures import decode_error, encode_error, error_in_traceback, user_error


class _Refuses:
    """A Ray Data actor that refuses every batch, as an index actor does with bad input."""

    def __call__(self, batch):
        raise InputError("example 'x' cannot be used: set train.label_column")


def test_an_error_in_a_ray_data_actor_is_found_again(ray_cluster):
    import ray

    with pytest.raises(Exception) as info:
        ray.data.range(4).map_batches(_Refuses, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25).materialize()
    assert type(info.value) is not InputError  # Ray wrapped it
    found = user_error(info.value) or error_in_traceback(str(info.value))
    assert type(found) is InputError and str(found) == "example 'x' cannot be used: set train.label_column"


def test_an_error_in_a_ray_task_is_its_cause(ray_cluster):
    import ray

    @ray.remote
    def refuse():
        raise ManifestMismatchError("the index was built with another model")

    with pytest.raises(Exception) as info:
        ray.get(refuse.remote())
    found = user_error(info.value)
    assert type(found) is ManifestMismatchError and str(found) == "the index was built with another model"


def test_an_input_error_in_ray_train_workers_is_raised_once_on_the_driver(ray_cluster, tmp_path):
    """Pools narrower than k: every worker refuses before any collective, the run is not
    retried (max_failures=2 would restart it twice) and the driver raises InputError itself."""
    from attribution_core.config import WeightsConfig
    from pipelines.weights.train import AspectPools, TrainStorage, optimise

    part = AspectPools(contrib=np.zeros((4, 3, 2)), valid=np.ones((4, 3), bool), noise=np.tile(np.eye(2), (4, 1, 1)))
    with pytest.raises(InputError, match="top-k of 5 needs pools of at least 5 candidates, got 3"):
        optimise([part], np.zeros((1, 2)), WeightsConfig(top_k=5, pool_size=5, lambda_w=0.0, steps=3, learning_rate=0.1,
                                                          workers=2, report_every=1), TrainStorage(str(tmp_path)), name="refused")


def test_errors_cross_as_data_and_in_traceback_text():
    again = decode_error(encode_error(ManifestMismatchError("differs")))
    assert type(again) is ManifestMismatchError and str(again) == "differs"
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
            "attribution_core.index.opening.EmptyIndexError: index version v1 at /i has no rows\n")
    found = error_in_traceback(text)
    assert isinstance(found, AttributionError) and str(found) == "index version v1 at /i has no rows"
    assert error_in_traceback("RuntimeError: CUDA out of memory") is None
    assert user_error(RuntimeError("not ours")) is None
