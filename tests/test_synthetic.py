"""The synthetic generator has the shape it is asked for: catalog size, popularity skew, events per
person; the same seed gives the same log."""

import numpy as np
import pytest

from attune.shared.errors import DataError
from attune.simulations.datasets import synthetic
from attune.simulations.runner import DataSource


def test_the_log_has_the_catalog_and_events_asked_for():
    log = synthetic(num_users=50, num_items=5000, events_per_user=(30, 150), zipf=1.0, seed=3)
    assert log.num_items == 5000 and len(log.item_ids) == 5000  # every catalog item, touched or not
    per_user = np.bincount(log.users, minlength=log.num_users)
    assert per_user.min() >= 30 and per_user.max() <= 150
    assert len(np.unique(log.items)) < 5000
    again = synthetic(num_users=50, num_items=5000, events_per_user=(30, 150), zipf=1.0, seed=3)
    assert np.array_equal(log.items, again.items) and np.array_equal(log.timestamps, again.timestamps)


def test_a_larger_zipf_exponent_concentrates_popularity():
    def head_share(zipf: float) -> float:
        log = synthetic(num_users=300, num_items=10_000, events_per_user=60, zipf=zipf, seed=1)
        counts = np.sort(np.bincount(log.items, minlength=log.num_items))[::-1]
        return counts[:100].sum() / counts.sum()

    assert head_share(0.5) < head_share(1.0) < head_share(1.5)


@pytest.mark.parametrize("events", ["1", "30-10", "a-b", "", "5-"])
def test_bad_event_counts_are_refused(events):
    with pytest.raises(DataError, match="synthetic_events"):
        DataSource(synthetic_events=events)


def test_the_command_line_shape_reaches_the_generator():
    log = DataSource(synthetic_users=20, synthetic_items=2000, synthetic_zipf=1.2, synthetic_events="40-60").load(0)
    assert log.num_users == 20 and log.num_items == 2000
    assert 40 <= np.bincount(log.users).min() and np.bincount(log.users).max() <= 60
