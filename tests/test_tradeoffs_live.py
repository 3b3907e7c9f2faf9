"""The pieces behind /v1/tradeoffs and the SLO route, on known data: the latency window against
numpy, calibration's time bound, Pareto flags on a hand-made table, routing decisions."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from model_store import ModelStore
from service.batcher import DynamicBatcher
from service.calibration import Calibration, Calibrator, batch_sizes, calibrate
from service.config import Settings
from service.errors import Unprocessable
from service.latency import LatencyWindow
from service.metrics import ServiceMetrics
from service.registry import Registry
from service.routing import Reason, decide, default_pool, expected_latency_s
from service.tradeoffs import LiveStats, pareto, stage_reach, to_csv, tradeoffs
from service.variants import Cascade, Runner, SingleModel
from tests.onnx_fixtures import METRICS, fields, linear_model, weights


# ---- the window -----------------------------------------------------------------------------------
def test_window_quantiles_match_numpy_over_the_last_capacity_observations():
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=-4, sigma=1, size=5000)
    window = LatencyWindow(capacity=2048, max_age_s=1e6, started=0.0)
    for i, v in enumerate(values):
        window.observe(float(v), now=i * 0.001)
    stats = window.stats(now=5.0)
    expected = 1000 * np.quantile(values[-2048:], (0.5, 0.95, 0.99))
    assert stats.count == 2048
    assert np.allclose([stats.p50_ms, stats.p95_ms, stats.p99_ms], expected)
    # a full window spans its oldest..now: 2048 observations over (5.0 - 2.952) s
    assert stats.requests_per_s == pytest.approx(2048 / (5.0 - 2952 * 0.001))


def test_window_forgets_observations_older_than_its_max_age():
    window = LatencyWindow(capacity=100, max_age_s=10, started=0.0)
    for t in range(20):
        window.observe(1.0 if t < 10 else 0.002, now=float(t))
    stats = window.stats(now=25.0)  # only t = 15..19 are within 10 s
    assert stats.count == 5 and stats.p99_ms == pytest.approx(2.0)
    assert stats.requests_per_s == pytest.approx(5 / 10)
    assert window.stats(now=100.0).count == 0 and window.stats(now=100.0).p50_ms is None


# ---- Pareto ------------------------------------------------------------------------------------------
def test_pareto_flags_on_a_hand_made_table():
    table = [(0.90, 10.0), (0.95, 20.0), (0.85, 15.0), (None, 1.0), (0.95, 25.0), (0.90, 10.0), (0.97, None)]
    # (0.85, 15) is beaten by (0.90, 10); (0.95, 25) by (0.95, 20); unknowns are never on the front;
    # equal points do not dominate each other
    assert pareto(table) == [True, True, False, False, False, True, False]


# ---- calibration and routing on real runners ----------------------------------------------------------
@pytest.fixture
def registry(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish({**fields("accurate"), "metrics": {**METRICS, "accuracy": 0.95}}, linear_model(tmp_path / "a.onnx", weights(0)))
    store.publish({**fields("quick"), "metrics": {**METRICS, "accuracy": 0.85}}, linear_model(tmp_path / "q.onnx", weights(1)))
    store.publish({**fields("other-labels"), "labels": ["x", "y", "z"], "metrics": {**METRICS, "accuracy": 0.99}},
                  linear_model(tmp_path / "o.onnx", weights(2)))
    registry = Registry(Settings(store=store.root, max_batch_size=8), ServiceMetrics())
    asyncio.run(registry.reload())
    return registry


def test_calibration_is_bounded_in_time_and_measures_every_batch_size(registry):
    runner = registry.get("accurate").runners[0]
    started = time.monotonic()
    result = calibrate(runner, budget_s=0.4)
    assert time.monotonic() - started < 1.5
    assert result.batch1_ms > 0 and result.images_per_s > 0 and result.best_batch in batch_sizes(8)
    assert batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(6) == [1, 2, 4, 6] and batch_sizes(1) == [1]


def _calibrated(registry, **batch1_ms: float) -> Calibrator:
    calibrator = Calibrator(0.1)
    for name, ms in batch1_ms.items():
        runner = registry.get(name).runners[0]
        calibrator.results[runner.key] = Calibration(ms, 8, 8000 / ms, time.time())
        runner.batcher.throughput.seconds_per_image = ms / 1000 / 4  # batches of 8 run 2x faster per image
    return calibrator


def test_default_pool_keeps_the_common_label_set(registry):
    pool = default_pool(registry.served(), [])
    assert sorted(v.manifest.name for v in pool) == ["accurate", "quick"]
    assert [v.manifest.name for v in default_pool(registry.served(), ["quick"])] == ["quick"]


def test_routing_picks_by_budget_and_floor(registry):
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60)
    pool = default_pool(registry.served(), [])

    def pick(budget_ms, floor):
        d = decide(pool, calibrator, live, None if budget_ms is None else budget_ms / 1000, floor)
        return d.order[0].variant.manifest.name, d.reasons[0]

    assert pick(None, None) == ("accurate", Reason.MOST_ACCURATE)
    assert pick(50, None) == ("accurate", Reason.FITS_BUDGET)
    assert pick(10, None) == ("quick", Reason.FITS_BUDGET)
    assert pick(1, None) == ("quick", Reason.OVER_BUDGET_CHEAPEST)  # nothing fits: the cheapest, flagged
    assert pick(10, 0.9) == ("accurate", Reason.OVER_BUDGET_CHEAPEST)  # the floor excludes the quick one
    with pytest.raises(Unprocessable, match="the most accurate is accurate at 0.9500"):
        pick(10, 0.96)


def test_measured_misses_of_the_estimate_correct_later_estimates(registry):
    """A variant whose requests keep taking longer than expected (e.g. decoding it does not see)
    stops fitting a budget it only fitted on paper."""
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60)
    pool = default_pool(registry.served(), [])
    accurate = registry.get("accurate")
    key = str(accurate.manifest.ref)
    assert decide(pool, calibrator, live, 0.030, None).order[0].variant is accurate
    for _ in range(40):  # the estimate as used (its correction included) against 25 ms more than the model says
        live.observe_routed(key, expected_s=expected_latency_s(accurate, calibrator, live), actual_s=0.045)
    assert live.correction(key) == pytest.approx(0.025, rel=0.05)  # all of the miss, not half of it
    assert expected_latency_s(accurate, calibrator, live) == pytest.approx(0.045, rel=0.05)
    assert decide(pool, calibrator, live, 0.030, None).order[0].variant.manifest.name == "quick"


def test_a_variant_one_slow_request_locked_out_is_routed_again_once_the_correction_fades(registry):
    """One very slow routed request (a page fault, a GC pause) moves a little of the way and fades:
    the variant is chosen again, and measured again, instead of being excluded for good."""
    now = [0.0]
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60, correction_half_life_s=30, clock=lambda: now[0])
    pool = default_pool(registry.served(), [])
    key = str(registry.get("accurate").manifest.ref)
    live.observe_routed(key, expected_s=0.020, actual_s=2.0)  # one request, 100 times slower than expected
    assert live.correction(key) == pytest.approx(0.198)  # a tenth of the miss, not all of it
    assert decide(pool, calibrator, live, 0.030, None).order[0].variant.manifest.name == "quick"
    now[0] = 300.0  # ten half-lives without a routed request
    assert live.correction(key) < 0.001
    assert decide(pool, calibrator, live, 0.030, None).order[0].variant.manifest.name == "accurate"


def test_recalibration_forgets_what_routing_learnt(registry):
    live = LiveStats(64, 60)
    key = str(registry.get("accurate").manifest.ref)
    for _ in range(10):
        live.observe_routed(key, expected_s=0.020, actual_s=0.045)
    assert live.correction(key) > 0.01
    live.reset_corrections()
    assert live.correction(key) == 0.0


def test_equal_candidates_are_ordered_by_name_on_every_replica(registry):
    calibrator = _calibrated(registry, accurate=2.0, quick=2.0)
    pool = default_pool(registry.served(), [])
    for variant in pool:  # make them indistinguishable but for their names
        variant.manifest = variant.manifest.model_copy(update={"metrics": variant.manifest.metrics.model_copy(update={"accuracy": 0.9})})
    orders = {tuple(c.variant.manifest.name for c in decide(list(p), calibrator, LiveStats(64, 60), 1.0, None).order)
              for p in (pool, pool[::-1])}
    assert orders == {tuple(sorted(v.manifest.name for v in pool))}


def test_a_growing_queue_moves_the_choice_to_the_cheaper_variant(registry):
    """Images queued behind a busy batch raise the accurate variant's expected latency past the budget."""
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60)
    pool = default_pool(registry.served(), [])
    release = threading.Event()

    async def main():
        slow = DynamicBatcher(lambda rows: (release.wait(5), [rows[:, 0, 0, :3]])[1], max_batch_size=8,
                              max_queue_delay_s=0, max_queue_size=512, max_queue_wait_s=60, name="blocked")
        slow.throughput.seconds_per_image = 0.005
        runner = registry.get("accurate").runners[0]
        blocked = SingleModel(Runner(runner.manifest, runner.runtime, slow))
        calibrator.results[blocked.runners[0].key] = calibrator.results[runner.key]
        variants = [blocked, registry.get("quick")]
        before = decide(variants, calibrator, live, 0.05, None)
        tasks = [asyncio.create_task(slow.submit(np.zeros((8, 1, 4, 4), np.float32), time.monotonic() + 10)) for _ in range(4)]
        await asyncio.sleep(0.05)
        after = decide(variants, calibrator, live, 0.05, None)
        queued_ms = 1000 * expected_latency_s(blocked, calibrator, live)
        # the blocked runner shares the device: the quick variant's estimate doubles while it works
        quick = registry.get("quick")
        alone = expected_latency_s(quick, calibrator, live)
        shared = decide(variants, calibrator, live, 0.05, None, runners=[blocked.runners[0], quick.runners[0]])
        sharing = next(c for c in shared.order if c.variant is quick).expected_s / alone
        release.set()
        await asyncio.gather(*tasks)
        await slow.close()
        return before, after, queued_ms, sharing

    before, after, queued_ms, sharing = asyncio.run(main())
    assert sharing == pytest.approx(2.0)
    assert before.order[0].variant.manifest.name == "accurate"
    assert queued_ms > 50 and after.order[0].variant.manifest.name == "quick" and after.reasons[0] is Reason.FITS_BUDGET


def test_tradeoff_rows_carry_offline_live_and_calibrated_numbers(registry):
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60)
    for s in (0.010, 0.020, 0.030):
        live.window(str(registry.get("quick").manifest.ref)).observe(s)
    rows = {r.name: r for r in tradeoffs(registry.served(), calibrator, live, Settings(intra_op_threads=2))}
    quick, accurate, other = rows["quick"], rows["accurate"], rows["other-labels"]
    assert quick.live_requests == 3 and quick.live_p50_ms == pytest.approx(20.0)
    assert quick.cost_per_1000_images == pytest.approx(1000 * 2 / quick.images_per_s) and quick.cost_unit == "core-seconds"
    assert quick.pareto_latency and accurate.pareto_latency and other.batch1_ms is None and not other.pareto_latency
    assert to_csv(list(rows.values())).splitlines()[0].startswith("name,version,kind,accuracy")


def test_cascade_reach_uses_test_exit_rates_until_live_ones_are_enough(store_dir):
    registry = Registry(Settings(store=store_dir), ServiceMetrics())
    asyncio.run(registry.reload())
    cascade = registry.get("cascade")
    live = LiveStats(64, 60)
    assert stage_reach(cascade, live) == ([1.0, 1.0], "assumed")  # the fixture manifest has no exit rates
    live.observe_exits(str(cascade.manifest.ref), np.array([1] * 150 + [2] * 50), 2)
    assert stage_reach(cascade, live) == ([1.0, 0.25], "live")
    asyncio.run(registry.close())


def test_the_cascade_threshold_comes_down_under_a_saturated_runner_and_back_up_when_it_drains(store_dir):
    """The fixture cascade has three operating points (second-stage reach 0.4, 0.15, 0): as its
    second stage's queue grows, the route lowers the thresholds before anything else; drained, it
    serves the default again."""
    registry = Registry(Settings(store=store_dir), ServiceMetrics())
    asyncio.run(registry.reload())
    cascade = registry.get("cascade")
    first, second = cascade.stages
    calibrator = Calibrator(0.1)
    for runner in (first, second):
        calibrator.results[runner.key] = Calibration(2.0, 8, 4000, time.time())
    live = LiveStats(64, 60)
    release = threading.Event()

    def chosen(variant: Cascade) -> tuple[str, int]:
        top = decide([variant], calibrator, live, 0.05, None).order[0]
        return top.variant.manifest.name, top.variant.point

    async def main():
        stuck = DynamicBatcher(lambda rows: (release.wait(5), second.runtime.run(rows))[1], max_batch_size=8,
                               max_queue_delay_s=0, max_queue_size=512, name="stage-2")
        stuck.throughput.seconds_per_image = 0.005  # 5 ms per image: 40 queued images are 200 ms of work
        saturable = Cascade(cascade.manifest, [first, Runner(second.manifest, second.runtime, stuck)])
        calibrator.results[saturable.stages[1].key] = calibrator.results[second.key]
        steps = [chosen(saturable)]
        rows = np.zeros((8, 1, 4, 4), np.float32)
        tasks = [asyncio.create_task(stuck.submit(rows, time.monotonic() + 10)) for _ in range(5)]
        await asyncio.sleep(0.05)
        steps.append(chosen(saturable))  # 2 + 0.4 x 200 ms > 50 ms; 2 + 0.15 x 200 ms fits
        tasks += [asyncio.create_task(stuck.submit(rows, time.monotonic() + 10)) for _ in range(20)]
        await asyncio.sleep(0.05)
        steps.append(chosen(saturable))  # 2 + 0.15 x 1 s does not fit either: every image exits at stage 1
        release.set()
        await asyncio.gather(*tasks)
        steps.append(chosen(saturable))
        await stuck.close()
        return steps

    steps = asyncio.run(main())
    asyncio.run(registry.close())
    assert steps == [("cascade", 0), ("cascade", 1), ("cascade", 2), ("cascade", 0)]


def test_a_cascade_at_a_lower_operating_point_exits_by_that_points_threshold(store_dir):
    registry = Registry(Settings(store=store_dir), ServiceMetrics())
    x = np.random.default_rng(3).normal(size=(64, 1, 4, 4)).astype(np.float32) * 3

    async def main():
        await registry.reload()
        cascade = registry.get("cascade")
        first = (await cascade.stages[0].batcher.submit(x, time.monotonic() + 10)).outputs[0]
        exits = [(await cascade.at(k).predict(x, time.monotonic() + 10)).exit_stage for k in range(cascade.points)]
        await registry.close()
        return first, exits

    first, exits = asyncio.run(main())
    confidence = np.exp(first - first.max(1, keepdims=True))
    confidence = (confidence / confidence.sum(1, keepdims=True)).max(1)
    for threshold, stages in zip((0.9, 0.6, 0.0), exits):
        np.testing.assert_array_equal(stages == 1, confidence >= threshold)
    assert (exits[0] == 2).sum() > (exits[1] == 2).sum() > 0 and (exits[2] == 1).all()


def test_the_estimate_covers_every_image_of_the_request(registry):
    """A request of 16 images rides with 16 images' compute (and past max_batch_size, in two batches)."""
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60)
    accurate = registry.get("accurate")  # 20 ms alone, 5 ms per image in full batches of 8
    one, eight, sixteen = (expected_latency_s(accurate, calibrator, live, images=n) for n in (1, 8, 16))
    assert one == pytest.approx(0.020) and eight == pytest.approx(0.040) and sixteen == pytest.approx(0.080)
    order = decide([accurate, registry.get("quick")], calibrator, live, 0.05, None, images=16).order
    assert order[0].variant.manifest.name == "quick"  # the accurate one fits one image, not sixteen


def test_a_loaded_server_sends_what_fits_only_the_whole_budget_to_the_cheapest(registry):
    """24 ms of requests ahead, a 50 ms budget: both variants fit it, neither fits half of it, so the
    route takes the cheaper one; with room (nothing ahead) it takes the accurate one."""
    calibrator = _calibrated(registry, accurate=20.0, quick=2.0)
    live = LiveStats(64, 60)
    pool = [registry.get("accurate"), registry.get("quick")]
    loaded = decide(pool, calibrator, live, 0.05, None, ahead_s=0.024, headroom=0.5)
    assert [c.variant.manifest.name for c in loaded.order] == ["quick", "accurate"]
    assert loaded.reasons == [Reason.FITS_BUDGET_CHEAPEST] * 2
    idle = decide(pool, calibrator, live, 0.05, None, headroom=0.5)
    assert idle.order[0].variant.manifest.name == "accurate" and idle.reasons[0] is Reason.FITS_BUDGET
