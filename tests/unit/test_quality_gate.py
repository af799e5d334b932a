"""The quality gate's policy over fakes: best-of-N, percentile thresholds, the tallies behind them.

The fake generator paints seed % 256 as a flat grey and the fake scorer reads it back (aesthetic =
grey / 255), so a seed decides a score.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest
from serve_app.services.quality import BINS, MIN_SAMPLES, MemoryQualityBook, bin_of, load_calibration, score_at
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import app_settings

MODEL = "flux-schnell"  # the default of tests.helpers.model_entry


def _images(generator=None, calibration=None, **policy):
    services = fake_services(app_settings(policy={"metric": "aesthetic", **policy}), generator=generator)
    services.images.quality = MemoryQualityBook(calibration)
    return services.images


def _run(images, **fields):
    async def go():
        response = await images.generate_images(ImageRequest(prompt="a lighthouse", **fields))
        await images.quality.drain()
        return response

    return asyncio.run(go())


def test_best_of_n_generates_all_candidates_in_one_call_and_returns_the_best():
    generator = FakeGenerator()
    response = _run(_images(generator), seed=10, candidates=4)
    assert [params.seeds for params, _ in generator.calls] == [[10, 11, 12, 13]]
    assert [image.seed for image in response.images] == [13]  # the greyest, the highest aesthetic
    assert [(c.seed, c.chosen) for c in response.candidates] == [(10, False), (11, False), (12, False), (13, True)]
    assert response.candidates[3].scores.aesthetic == pytest.approx(13 / 255)


def test_best_of_n_returns_the_best_num_images_in_the_order_they_were_made():
    response = _run(_images(), seed=250, candidates=5, num_images=2)  # seeds 250-254: 253 and 254 are best
    assert [image.seed for image in response.images] == [253, 254]
    assert sum(c.chosen for c in response.candidates) == 2


def test_without_candidates_every_image_made_is_returned_as_before():
    response = _run(_images(), seed=5, num_images=2)
    assert [image.seed for image in response.images] == [5, 6]
    assert all(c.chosen for c in response.candidates)


def test_best_of_n_keeps_its_extra_candidates_in_later_rounds():
    generator = FakeGenerator()
    # Seeds 0-2 score below 0.5; round 2 makes 1 missing + 2 extra, all below again.
    _run(_images(generator), seed=0, candidates=3, quality_threshold=0.5, max_attempts=2)
    assert [params.seeds for params, _ in generator.calls] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("fields, words", [
    ({"candidates": 1, "num_images": 2}, "at least num_images"),
    ({"candidates": 9}, "policy.max_candidates"),
])
def test_candidates_out_of_range_is_refused_naming_the_field(fields, words):
    with pytest.raises(RequestError) as caught:
        _images().plan(ImageRequest(prompt="a fox", **fields))
    assert caught.value.field == "candidates" and words in str(caught.value)


def test_the_config_bounds_candidates():
    images = _images(max_candidates=2)
    with pytest.raises(RequestError, match="at most 2"):
        images.plan(ImageRequest(prompt="a fox", candidates=3))


def test_score_at_reads_the_percentile_through_the_bins():
    scores = [value / 100 for value in range(100)]  # 0.00, 0.01, ... 0.99
    bins = {bin_of("aesthetic", score): 1.0 for score in scores}
    threshold = score_at("aesthetic", bins, 70)
    assert sum(score >= threshold for score in scores) == 30  # the top 30% pass
    assert score_at("aesthetic", bins, 0) <= min(scores)  # everything passes
    assert score_at("aesthetic", {0: MIN_SAMPLES - 1.0}, 50) is None  # too few images to calibrate


def _calibration_at(score: float, images: int = 100) -> dict:
    return {MODEL: {"aesthetic": {bin_of("aesthetic", score): float(images)}}}


def test_percentile_without_a_calibration_is_refused_saying_so():
    with pytest.raises(RequestError) as caught:
        _run(_images(), quality_percentile=70)
    assert caught.value.field == "quality_percentile" and "no calibration for 'aesthetic'" in str(caught.value)


def test_percentile_and_threshold_together_are_refused():
    with pytest.raises(RequestError, match="not both"):
        _run(_images(calibration=_calibration_at(0.5)), quality_percentile=70, quality_threshold=0.5)


def test_percentile_regenerates_until_an_image_passes():
    # The calibration puts the 70th percentile just above seed 200's grey (0.7843) and below 201's (0.7882).
    images = _images(calibration=_calibration_at(0.785))
    response = _run(images, seed=200, quality_percentile=70, max_attempts=3)
    assert response.quality_percentile == 70
    assert 0.785 < response.quality_threshold < 0.7851
    assert [(a.seed, a.passed) for a in response.attempts] == [(200, False), (201, True)]
    assert response.passed


def test_every_request_adds_to_the_tallies_and_the_summary():
    images = _images(calibration=_calibration_at(0.785))
    _run(images, seed=200, quality_percentile=70, max_attempts=3)  # 1st round fails, the 2nd passes
    _run(images, seed=240, quality_threshold=0.5)  # passes at once
    figures = asyncio.run(images.quality.summary())[MODEL]["aesthetic"]
    assert figures["first_attempt_images"] == 2 and figures["first_attempt_pass_rate"] == 0.5
    assert figures["accepted_images"] == 2 and figures["attempts_per_accepted_image"] == 1.5
    assert figures["calibration_images"] == 100 and figures["scored_images"] == 3
    # Seen scores join the calibration: the images above it pull the upper percentiles up.
    assert figures["percentiles"]["90"] > 0.785


def test_scores_of_every_gate_metric_are_tallied_for_calibration():
    images = _images(max_candidates=10)
    _run(images, seed=100, candidates=10)
    _run(images, seed=110, candidates=10)  # seeds 100-119
    bins = asyncio.run(images.quality.calibration(MODEL, "alignment"))
    assert sum(bins.values()) == 20 == MIN_SAMPLES  # the requests gated on aesthetic; alignment is calibrated too
    response = _run(images, seed=1, quality_metric="alignment", quality_percentile=50)
    assert 100 * 100 / 255 < response.quality_threshold < 100 * 120 / 255


def test_a_calibration_file_from_another_bin_count_is_refused(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text('{"bins": 10, "models": {}}')
    with pytest.raises(ValueError, match="genserve calibrate"):
        load_calibration(str(path))
    path.write_text(f'{{"bins": {BINS}, "models": {{"m": {{"aesthetic": {{"5000": 3}}}}}}}}')
    assert load_calibration(str(path)) == {"m": {"aesthetic": {5000: 3.0}}}


def test_the_bench_splits_rounds_past_max_attempts_and_prints_its_tables():
    from serve_app.bench.quality import Run, _rounds, format_candidates_table, format_gate_table, random_prompts

    assert [body["max_attempts"] for body in _rounds({"prompt": "x"}, 8)] == [5, 3]
    assert random_prompts(3, seed=1) == random_prompts(3, seed=1) != random_prompts(3, seed=2)
    batch = Run("best-of-4", [0.2, 0.4], [1, 1], [4, 4], [1, 1], [0.1, 0.3])
    rounds = Run("4 rounds", [0.8, 1.2], [4, 4], [4, 4], [0, 0], [0.4, 0.4])
    table = format_candidates_table([(4, batch, rounds)])
    assert table.splitlines()[1].split()[:4] == ["4", "300.0", "1000.0", "0.300"]
    gate = format_gate_table([batch, rounds])
    assert gate.splitlines()[2].split()[-1] == "-"  # nothing accepted: no cost per accepted image


def test_the_job_store_book_shares_one_calibration_between_readers(tmp_path):
    from serve_app.jobs.quality import StoreQualityBook
    from serve_app.jobs.sqlite_store import SqliteJobStore

    store = SqliteJobStore(tmp_path, ttl_s=60)
    writer, reader = StoreQualityBook(store), StoreQualityBook(store, starting=_calibration_at(0.5, images=10))

    async def go():
        await writer.add(MODEL, {"aesthetic": {f"b{bin_of('aesthetic', 0.9)}": 10.0, "accepted": 2.0}})
        return await reader.calibration(MODEL, "aesthetic"), await reader.summary()

    bins, summary = asyncio.run(go())
    assert sum(bins.values()) == 20  # the reader's shipped 10 and the writer's 10
    assert score_at("aesthetic", bins, 25) < 0.51 < 0.89 < score_at("aesthetic", bins, 75)
    assert summary[MODEL]["aesthetic"]["accepted_images"] == 2
    store.close()
