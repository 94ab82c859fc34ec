"""The real coordinator loop through an in-process Grid: signed rounds, device-level DP recomputed
by dp-accounting, Poisson sampling, dropouts, robust rules, and resume after an interruption."""

import math
import shutil
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from in_process_grid import device_grid, simulated_devices
from scipy.stats import binom

from attune.client.personalizer import Personalizer
from attune.server.app import transport_for
from attune.server.checkpoint import latest_checkpoint
from attune.server.config import ServerConfig
from attune.server.coordinator import run, sample
from attune.server.planning import plan
from attune.shared.accounting import ORDERS, epsilon_of
from attune.shared.config import preset
from attune.shared.errors import StoreError
from attune.shared.randomness import Stream
from attune.shared.records import received
from attune.shared.signing import load_public_key, verify
from attune.shared.vocabulary import Vocabulary
from attune.shared.wire import RoundRequest
from attune.simulations.devices import store_path

DEVICES = 6


@pytest.fixture
def devices(tmp_path):
    log, _, vocabulary = simulated_devices(tmp_path / "devices", users=DEVICES, seed=1)
    return tmp_path / "devices", log, vocabulary


def _config(directory, log, mode="local", **changes):
    base = ServerConfig(mode=mode, rounds=3, min_devices=DEVICES, target_epsilon=4.0, noise_seed=11, seed=11,
                               signing_key=directory / "coordinator.pem", out_dir=directory / "run")
    return replace(base, model=replace(base.model, num_items=log.num_items, dim=4, use_context=False), **changes)


def _visible_release_epsilon(z: float, q: float, pivot: float, rounds: int, delta: float) -> float:
    """Independent reference (dp-accounting's RDP): a Poisson-sampled Gaussian whose round also
    shows whether it released, which hinged on the device with probability ``pivot``: that round,
    with the others' outcome given away, is a plain Gaussian or nothing."""
    orders = np.asarray(ORDERS)
    accountant = rdp.RdpAccountant(orders=list(ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    sampled = np.asarray(accountant._rdp)  # the curve itself (dp-accounting has no public accessor): it is mixed
    with np.errstate(over="ignore"):
        mixed = np.log((1 - pivot) * np.exp((orders - 1) * sampled)
                       + pivot * (q * np.exp((orders - 1) * orders / (2 * z * z)) + 1 - q)) / (orders - 1)
    return rdp.rdp_privacy_accountant.compute_epsilon(orders, rounds * mixed, delta)[0]


def test_every_round_is_signed_and_device_level_dp_recomputes_with_dp_accounting(devices):
    directory, log, vocabulary = devices
    grid = device_grid(directory, DEVICES, vocabulary, seed=1)
    config = _config(directory, log, devices_per_round=3, device_level_noise=1.3)
    history = run(transport_for(grid, config), config)
    public = load_public_key(directory / "coordinator.pub.pem")
    for message in grid.delivered:  # every round a device received verifies, config and all
        arrays, items = received(message.content)
        verify(public, arrays, items)
        assert RoundRequest.parse(arrays, items).config.noise_multiplier > 1.0
    pivot = binom.pmf(0, DEVICES - 1, 0.5)  # released iff anyone was sampled: with none of the 5 others, on it
    assert history[-1].device_level_epsilon == pytest.approx(
        _visible_release_epsilon(1.3, 0.5, pivot, len(history), 1e-5), rel=1e-3)
    by_pld = pld.PLDAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.3)), len(history))).get_epsilon(1e-5)
    assert history[-1].device_level_epsilon >= by_pld * 0.999
    joined = [m for m in grid.delivered if received(m.content)[1]["server-round"] == len(history)]
    with Personalizer(store_path(directory, joined[0].metadata.dst_node_id), model=config.model,
                      vocabulary=Vocabulary.of(list(log.item_ids))) as device:
        shown = device.privacy_report().device_level  # the signed guarantee, in the person's report
        assert shown is not None and shown["epsilon"] == pytest.approx(history[-1].device_level_epsilon)


def test_device_sampling_is_poisson_from_the_coordinator_stream():
    sizes = [len(sample(list(range(1000)), 0.1, Stream.seeded_from(0, k))) for k in range(50)]
    assert min(sizes) < 100 < max(sizes) and abs(sum(sizes) / 50 - 100) < 10
    assert sample([1, 2, 3], 1.0, Stream.secure()) == [1, 2, 3]


def test_sampled_rounds_plan_survivors_under_the_cohorts_lower_tail():
    """With Poisson sampling the cohort varies: m is planned so that sampling alone almost never
    aborts a round; with every device asked, m is the fraction of all of them."""
    sampled = plan(ServerConfig(mode="distributed", devices_per_round=100), 943)
    assert sampled.round.min_survivors == math.ceil(0.9 * (100 - 3 * math.sqrt(100 * (1 - 100 / 943))))
    cohorts = [len(sample(list(range(943)), sampled.sample_rate, Stream.seeded_from(2, k))) for k in range(2000)]
    assert sum(size < sampled.round.min_survivors for size in cohorts) <= 2
    assert plan(ServerConfig(mode="distributed"), 943).round.min_survivors == math.ceil(0.9 * 943)


def test_dropped_devices_are_counted_and_the_round_completes(devices):
    directory, log, vocabulary = devices
    grid = device_grid(directory, DEVICES, vocabulary, seed=1)
    grid.offline = {4}
    config = _config(directory, log, rounds=2)
    history = run(transport_for(grid, config), config)
    assert [(r.contributed, r.failed) for r in history] == [(5, 1), (5, 1)]


def test_a_robust_rule_runs_on_each_contribution(devices):
    directory, log, vocabulary = devices
    config = _config(directory, log, rounds=2, aggregation="trimmed-mean", trim_fraction=0.2)
    history = run(transport_for(device_grid(directory, DEVICES, vocabulary, seed=1), config), config)
    assert [r.contributed for r in history] == [DEVICES, DEVICES]  # the count, then a training round


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(devices, tmp_path):
    directory, log, vocabulary = devices
    shutil.copytree(directory, tmp_path / "copy")
    full = _config(tmp_path / "copy", log, rounds=4)
    states = []
    run(transport_for(device_grid(tmp_path / "copy", DEVICES, tmp_path / "copy" / vocabulary.name, seed=1), full),
        full, lambda record, state: states.append(state))

    class Crash(Exception):
        pass

    def crash_after_two(record, state):
        if record.round == 2:
            raise Crash  # the coordinator dies after its checkpoint of round 2

    config = _config(directory, log, rounds=4)
    with pytest.raises(Crash):
        run(transport_for(device_grid(directory, DEVICES, vocabulary, seed=1), config), config, crash_after_two)
    resumed_states = []
    resumed = replace(config, resume=True)
    history = run(transport_for(device_grid(directory, DEVICES, vocabulary, seed=1), resumed), resumed,
                  lambda record, state: resumed_states.append(state))
    assert [r.round for r in history] == [3, 4] and all(r.contributed == DEVICES for r in history)
    for name, value in states[-1].items():
        torch.testing.assert_close(resumed_states[-1][name], value)
    assert latest_checkpoint(directory / "run" / "checkpoints").round == 4


def test_resume_without_a_checkpoint_that_verifies_is_refused(devices):
    directory, log, vocabulary = devices
    config = _config(directory, log, resume=True)
    with pytest.raises(StoreError, match="no checkpoint"):
        run(transport_for(device_grid(directory, DEVICES, vocabulary, seed=1), config), config)


def test_renamed_or_swapped_checkpoints_do_not_roll_the_run_back(devices):
    """Issue 20: the round came from the file name; a renamed or swapped file rolled the run back
    silently, a checkpoint symlinked to /dev/zero raised MemoryError, and resuming with another
    model raised a raw RuntimeError."""
    directory, log, vocabulary = devices
    config = _config(directory, log, rounds=3)
    run(transport_for(device_grid(directory, DEVICES, vocabulary, seed=1), config), config)
    folder = directory / "run" / "checkpoints"
    for suffix in ("", ".sha256"):  # swap rounds 2 and 3, checksums and all
        two, three = folder / f"global_round_0002.pt{suffix}", folder / f"global_round_0003.pt{suffix}"
        two.rename(folder / "swap"), three.rename(two), (folder / "swap").rename(three)
    (folder / "global_round_0009.pt").symlink_to("/dev/zero")
    (folder / "global_round_0009.pt.sha256").write_text("0" * 64)
    assert latest_checkpoint(folder).round == 3
    other = replace(config, resume=True, rounds=4, model=replace(config.model, dim=config.model.dim + 1))
    with pytest.raises(StoreError, match="another model"):
        run(transport_for(device_grid(directory, DEVICES, vocabulary, seed=1), other), other)


@pytest.mark.parametrize("population,per_round,survivors,stated", [(100, 2, 1, 7.41), (1000, 100, 64, 11.15)])
def test_rounds_that_release_nothing_are_accounted(population, per_round, survivors, stated):
    """Issue 19, item 8: an empty or aborted round shows the cohort was small, so whether a round
    released can hinge on one device. Every round is charged with that pivot; the numbers are the
    ones docs/privacy.md states (z = 1, 100 or 200 rounds, delta 1e-5)."""
    q = per_round / population
    rounds = 100 if population == 100 else 200
    round_config = preset("local") if survivors == 1 else preset("distributed", min_survivors=survivors)
    run_plan = replace(plan(ServerConfig(devices_per_round=per_round, device_level_noise=1.0), population),
                       round=round_config)
    entry = run_plan.device_level_entry()
    assert entry.mechanism.pivot == pytest.approx(binom.pmf(survivors - 1, population - 1, q), rel=1e-9)
    ours = epsilon_of([entry.times(rounds)], 1e-5)
    assert ours == pytest.approx(_visible_release_epsilon(1.0, q, entry.mechanism.pivot, rounds, 1e-5), rel=1e-3)
    assert ours == pytest.approx(stated, abs=0.01)
    unpivoted = replace(entry, mechanism=replace(entry.mechanism, pivot=0.0))
    blind = epsilon_of([unpivoted.times(rounds)], 1e-5)  # what was printed before
    assert ours >= blind


def test_a_deployed_run_in_which_no_round_released_anything_fails_saying_why():
    """Issue 23: a spent budget, an unsigned run or broken SuperNodes all ended with `flwr run`
    exiting 0. The ServerApp now fails such a run, naming the usual causes."""
    from attune.server.app import check_progress
    from attune.server.coordinator import RoundRecord
    from attune.shared.errors import ConfigError

    def record(contributed: int, aborted: str = "") -> RoundRecord:
        return RoundRecord(round=1, sampled=3, contributed=contributed, refused=3 - contributed, rejected=0, failed=0,
                           aborted=aborted, epsilon=0.0, device_level_epsilon=None)

    with pytest.raises(ConfigError, match="no round of this run released a sum.*signing-key"):
        check_progress([record(0), record(0)])
    with pytest.raises(ConfigError, match="4 declines"):
        check_progress([record(0), record(2, aborted="2 survivors, fewer than 3")])
    check_progress([record(0), record(3)])  # one released sum is progress


def test_only_the_newest_round_checkpoints_are_kept_and_resume_reads_them(tmp_path):
    """Issue 23: every run kept a checkpoint per round (80 MB for one MovieLens run) unasked."""
    from attune.server.checkpoint import Checkpoint, latest_checkpoint, prune_checkpoints, save_checkpoint

    folder = tmp_path / "checkpoints"
    for round_ in range(1, 8):
        save_checkpoint(folder, Checkpoint(round=round_, state={"w": torch.zeros(2)}, optimizer={}, run_id="r"))
        prune_checkpoints(folder, 3)
    assert sorted(p.name for p in folder.glob("global_round_*.pt")) == [
        "global_round_0005.pt", "global_round_0006.pt", "global_round_0007.pt"]
    assert len(list(folder.glob("*.sha256"))) == 4 and latest_checkpoint(folder).round == 7  # and global_final
    assert prune_checkpoints(folder, 0) == 0 and len(list(folder.glob("global_round_*.pt"))) == 3


def test_an_evaluation_round_under_device_level_dp_asks_every_device_and_is_charged_unsampled(devices):
    """Issue 22: an evaluation round asks every device, so its device-level entry is a plain
    Gaussian (no sampling, no pivot); the guarantee signed with it counts it so."""
    directory, log, vocabulary = devices
    grid = device_grid(directory, DEVICES, vocabulary, seed=1)
    config = _config(directory, log, devices_per_round=3, device_level_noise=1.3, eval_share=0.05)
    history = run(transport_for(grid, config), config)
    assert [r.task for r in history] == ["count", "train", "train", "evaluate"]
    assert history[-1].sampled == DEVICES
    orders = np.asarray(ORDERS)
    pivot = binom.pmf(0, DEVICES - 1, 0.5)
    plain = orders / (2 * 1.3**2)  # a Gaussian's RDP (Mironov 2017): the unsampled fourth round
    three_rounds = _visible_release_epsilon(1.3, 0.5, pivot, 3, 1e-5)  # the same three alone
    with_evaluation = history[-1].device_level_epsilon
    assert with_evaluation > three_rounds
    assert with_evaluation < rdp.rdp_privacy_accountant.compute_epsilon(orders, 4 * plain, 1e-5)[0]
    final = [m for m in grid.delivered if received(m.content)[1]["server-round"] == 4]
    assert len(final) == DEVICES and received(final[0].content)[1]["device-level-epsilon"] == pytest.approx(
        with_evaluation)
