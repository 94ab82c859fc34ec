"""Generated hostile inputs, one property per class of issue 20's campaign (API arguments, CSV rows,
device replies, store bytes): each runs few examples in the fast tier and many in the slow one, so
every class keeps being attacked on every run and thoroughly in CI."""

import csv
import io
import time
from collections.abc import Callable

import numpy as np
import pytest
from device_helpers import request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attune import Event, ModelConfig, Personalizer, PrivacyConfig, Retention, Vocabulary
from attune.shared.errors import AttuneError, DataError, ModelMismatchError
from attune.shared.mechanism import contribution_dim
from attune.shared.records import contribution_of
from attune.shared.wire import check_contribution
from attune.simulations.datasets import CsvColumns, load_csv

NOW = time.time()
FAST, THOROUGH = 25, 200  # examples per property in the fast and the slow tier


def in_both_tiers(**strategies: st.SearchStrategy) -> Callable:
    """``test_x, test_x_thorough = in_both_tiers(...)(check)``: the same property twice, the
    second marked slow with many more examples (a hypothesis profile per tier)."""
    def tiers(check: Callable) -> tuple[Callable, Callable]:
        common = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture,
                                                              HealthCheck.too_slow]}
        fast = settings(max_examples=FAST, **common)(given(**strategies)(check))
        thorough = settings(max_examples=THOROUGH, **common)(given(**strategies)(check))
        return fast, pytest.mark.slow(thorough)
    return tiers


ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.binary(max_size=30),
                     st.lists(st.text(max_size=8), max_size=4), st.lists(st.integers(), max_size=4))

CALLS: dict[str, Callable] = {  # each public entry point, called with one generated argument
    "rank": lambda d, x: d.rank(x),
    "rank(limit)": lambda d, x: d.rank(["item1", "item2"], limit=x),
    "rank(diversity)": lambda d, x: d.rank(["item1", "item2"], diversity=x),
    "score": lambda d, x: d.score(x),
    "explain": lambda d, x: d.explain(x),
    "record": lambda d, x: d.record(Event(x, "click", NOW)),
    "record_many": lambda d, x: d.record_many(x),
    "forget": lambda d, x: d.forget_item(x),
    "forget_event": lambda d, x: d.forget_event(x),
    "export_scorer": lambda d, x: d.export_scorer(x),
    "Vocabulary": lambda d, x: Vocabulary(x),
    "Vocabulary.of": lambda d, x: Vocabulary.of(x),
    "Retention(max_events)": lambda d, x: Retention(max_events=x),
    "Retention(max_age_days)": lambda d, x: Retention(max_age_days=x),
    "ModelConfig(num_items)": lambda d, x: ModelConfig(num_items=x),
    "ModelConfig(dim)": lambda d, x: ModelConfig(dim=x),
    "PrivacyConfig(epsilon_budget)": lambda d, x: PrivacyConfig(epsilon_budget=x),
    "PrivacyConfig(delta)": lambda d, x: PrivacyConfig(delta=x),
    "simulation_seed": lambda d, x: Personalizer(d.store.path.parent / "other.sqlite", simulation_seed=x).close(),
}


def check_api(tmp_path_factory, call, value):
    folder = tmp_path_factory.mktemp("api")
    device = Personalizer(folder / "d.sqlite", model=ModelConfig(num_items=20, dim=2),
                          vocabulary=Vocabulary.of([f"item{i}" for i in range(20)]))
    try:
        try:
            CALLS[call](device, value)
        except AttuneError:
            pass  # a clear error is the other allowed outcome; anything else fails the test
        device.rank(["item1", "item2"])  # and the device still works
    finally:
        device.close()


test_any_argument_to_a_public_entry_point_gives_a_result_or_an_attune_error, \
    test_any_argument_to_a_public_entry_point_thorough = \
    in_both_tiers(call=st.sampled_from(sorted(CALLS)), value=ANYTHING)(check_api)


FIELD = st.one_of(st.text(max_size=12), st.integers(-5, 10**10).map(str),
                  st.sampled_from(["", "-1", "--1", "nan", "inf", "1e400", "1.7e9", " 3 ", "\x00", "\ufeff", "\"",
                                   "a,b", "2024-01-01"]))


def check_csv(tmp_path_factory, rows, bom, header):
    path = tmp_path_factory.mktemp("csv") / "log.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8")
    try:
        log = load_csv(path, CsvColumns(time="ts"))
    except DataError:
        return
    assert len(log.users) == len([r for r in rows if r])  # every row but blank lines, with valid values
    assert np.isfinite(log.timestamps).all() and (log.weights > 0).all()
    assert log.items.max(initial=-1) < log.num_items and log.users.max(initial=-1) < log.num_users


test_any_csv_rows_give_a_log_or_a_data_error, test_any_csv_rows_thorough = in_both_tiers(
    rows=st.lists(st.lists(FIELD, min_size=0, max_size=5), max_size=8), bom=st.booleans(),
    header=st.sampled_from([["user", "item", "ts"], ["user", "item", "ts", "extra"], ["item", "user"],
                            ["user", "user", "item", "ts"], []]),
)(check_csv)


REQUEST = request(mode="local")
DIM = contribution_dim(REQUEST.model, REQUEST.config.task)
DTYPES = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                   st.just(np.dtype(">i8")), st.just(np.dtype("<i8")), st.just(np.dtype(np.longdouble)))


def check_reply(array):
    from flwr.app import Array, ArrayRecord, RecordDict

    try:
        content = RecordDict({"contribution": ArrayRecord({"contribution": Array(array)})})
    except Exception:  # noqa: BLE001 - a device that cannot even build this reply sends nothing
        return
    try:
        vector = check_contribution(contribution_of(content), REQUEST.model, REQUEST.config)
    except ModelMismatchError:
        return
    # accepted only as exactly what a private round expects
    assert array.dtype == np.dtype(np.int64) and array.shape == (DIM,)
    assert vector.dtype.is_floating_point is False and vector.shape == (DIM,)


test_any_reply_is_the_expected_vector_or_a_rejection, test_any_reply_thorough = in_both_tiers(
    array=hnp.arrays(DTYPES, st.one_of(st.just((DIM,)), hnp.array_shapes(max_dims=3, max_side=DIM + 2)),
                     elements=None, fill=st.nothing()) | hnp.arrays(np.int64, (DIM,), elements=st.integers(-3, 3)),
)(check_reply)


def _clean_store(folder) -> bytes:
    path = folder / "clean.sqlite"
    with Personalizer(path, model=ModelConfig(num_items=20, dim=2)) as device:
        device.grant_consent("v1")
        device.record_many(Event(f"item{i % 20}", "click", NOW - 100 + i) for i in range(40))
    return path.read_bytes()


def check_store_bytes(tmp_path_factory, offsets, noise):
    folder = tmp_path_factory.mktemp("store")
    data = bytearray(_clean_store(folder))
    for offset, byte in zip(offsets, noise, strict=False):
        data[offset % len(data)] = byte
    path = folder / "damaged.sqlite"
    path.write_bytes(bytes(data))
    try:
        with Personalizer(path, model=ModelConfig(num_items=20, dim=2)) as device:
            device.store.events()
            device.store.ledger()
            device.record(Event("item1", "click", NOW))
            device.rank(["item1", "item2"])
    except AttuneError:
        pass


test_any_damaged_store_bytes_give_a_store_or_an_attune_error, test_any_damaged_store_bytes_thorough = \
    in_both_tiers(offsets=st.lists(st.integers(0, 2**20), min_size=1, max_size=6),
                  noise=st.lists(st.integers(0, 255), min_size=1, max_size=6))(check_store_bytes)
