"""The reindex lease: exactly one holder, on local storage and on S3 (moto's server on
127.0.0.1), a stale lease taken over, a lost lease noticed."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from pipelines.reindex.lease import Lease, LeaseHeldError, LeaseLostError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "index")
    base = request.getfixturevalue("s3_base")
    return f"{base}/lease-{uuid.uuid4().hex[:8]}"


def test_one_holder_then_the_next(root):
    first = Lease(root, ttl_s=60, owner="first")
    first.acquire()
    with pytest.raises(LeaseHeldError, match="held by first") as held:
        Lease(root, ttl_s=60, owner="second").acquire()
    assert held.value.holder["owner"] == "first"
    first.renew()
    first.release()
    with Lease(root, ttl_s=60, owner="second") as second:
        assert second.held and second.holder()["owner"] == "second"
    assert not second.held


def test_stale_lease_is_taken_over_and_the_old_holder_notices(root):
    old = Lease(root, ttl_s=0.5, owner="old")
    old.acquire()
    time.sleep(0.7)  # the old holder died or stalled past its ttl
    new = Lease(root, ttl_s=60, owner="new")
    new.acquire()
    with pytest.raises(LeaseLostError, match="taken over"):
        old.renew()
    old.release()  # leaves the new holder's lease alone
    assert new.holder()["owner"] == "new"
    with pytest.raises(LeaseHeldError):
        Lease(root, ttl_s=60, owner="third").acquire()
    new.release()


def test_racing_runs_exactly_one_wins(root):
    winners, losers = [], []
    start = threading.Barrier(6)

    def run(i: int) -> None:
        lease = Lease(root, ttl_s=60, owner=f"run-{i}")
        start.wait()
        try:
            lease.acquire()
            winners.append(i)
        except LeaseHeldError:
            losers.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5
    assert Lease(root, owner="reader").holder()["owner"] == f"run-{winners[0]}"
