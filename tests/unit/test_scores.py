"""The scoring suite: perceptual checks, aspect scores, the LAION head, the combined metric, the gate."""

import asyncio
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from pydantic import ValidationError

from deployments.config import CombinedWeights, LaionHeadConfig, ScorerConfig
from deployments.scoring.clip_scorer import ASPECTS, SCORE_RANGES, ClipScorer, combined_score, normalised
from deployments.scoring.laion_head import LINEAR_INDICES, build_head, load_head, save_head
from deployments.scoring.perceptual import perceptual_scores
from deployments.tiny import build_tiny_laion_head, save_tiny
from serve_app.config import AppArgs, QualityPolicy
from serve_app.protocol.errors import RequestError
from serve_app.services.graph import Candidate, choose
from serve_app.services.validation import default_weights, quality_gate
from tests.helpers import flat_scores

PROMPT = "a lighthouse on a cliff"
SIDE = 64


def _checkerboard(cell: int = 4) -> np.ndarray:
    tiles = (np.indices((SIDE, SIDE)) // cell).sum(axis=0) % 2
    return np.repeat((tiles * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _blurred(image: np.ndarray, radius: float = 3) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _flat(rgb) -> np.ndarray:
    return np.full((SIDE, SIDE, 3), rgb, dtype=np.uint8)


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer.func_or_class(ScorerConfig(source="tiny"), metrics=False)


def _score(scorer, images, prompt=PROMPT, **kwargs):
    return asyncio.run(scorer.score(images, prompt, **kwargs))


# --- perceptual checks -----------------------------------------------------------------------

def test_sharp_checkerboard_is_sharper_than_its_blur():
    sharp, blurred = _checkerboard(), _blurred(_checkerboard())
    assert perceptual_scores(sharp)["sharpness"] > 10 * perceptual_scores(blurred)["sharpness"] > 0
    assert perceptual_scores(_flat(128))["sharpness"] == 0


def test_dark_image_is_darker():
    dark, light = perceptual_scores(_flat(20)), perceptual_scores(_flat(230))
    assert dark["brightness"] == pytest.approx(20 / 255, abs=1e-3)
    assert light["brightness"] == pytest.approx(230 / 255, abs=1e-3)
    assert perceptual_scores(_flat(0))["brightness"] == 0 and perceptual_scores(_flat(255))["brightness"] == 1


def test_grey_is_less_saturated_than_colour():
    grey, red = perceptual_scores(_flat(128)), perceptual_scores(_flat((220, 30, 30)))
    assert grey["saturation"] == 0 and perceptual_scores(_flat(0))["saturation"] == 0
    assert red["saturation"] == pytest.approx((220 - 30) / 220, abs=1e-3)


def test_flat_image_has_lower_contrast():
    flat, board = perceptual_scores(_flat(128)), perceptual_scores(_checkerboard())
    assert flat["contrast"] == 0
    assert board["contrast"] == pytest.approx(1.0, abs=1e-3)  # half black, half white: the most there is


def test_perceptual_rejects_non_images():
    with pytest.raises(ValueError, match="uint8"):
        perceptual_scores(np.zeros((8, 8), np.uint8))


# --- the scorer's dict: keys, shapes, ranges -------------------------------------------------

def test_every_score_per_image_in_its_range(scorer):
    images = np.stack([_checkerboard(), _blurred(_checkerboard()), _flat(20)])
    results = _score(scorer, images)
    assert len(results) == 3
    for scores in results:
        assert set(scores) == {"alignment", "aesthetic", "laion", "combined", "aspects", "perceptual"}
        for metric in ("alignment", "aesthetic", "laion", "combined"):
            low, high = SCORE_RANGES[metric]
            assert low <= scores[metric] <= high, metric
        assert set(scores["aspects"]) == set(ASPECTS)
        assert all(0 <= value <= 1 for value in scores["aspects"].values())
        assert set(scores["perceptual"]) == {"brightness", "contrast", "saturation", "sharpness"}
        assert all(isinstance(value, float) for value in flat_scores(scores).values())
    # The scorer's perceptual checks are the pixel functions' own.
    assert results[0]["perceptual"] == perceptual_scores(images[0])
    assert results[0]["perceptual"]["sharpness"] > results[1]["perceptual"]["sharpness"]
    assert results[2]["perceptual"]["brightness"] < results[0]["perceptual"]["brightness"]


def test_images_of_different_sizes_in_one_call(scorer):
    images = [_checkerboard(), np.zeros((40, 90, 3), np.uint8)]
    results = _score(scorer, images)
    alone = _score(scorer, images[1:])[0]
    assert flat_scores(results[1]) == pytest.approx(flat_scores(alone), abs=1e-4)


def test_one_forward_pass_per_call_whatever_the_batch(scorer, monkeypatch):
    calls = []
    model = scorer._scorers[0].tower.model
    original = model.get_image_features

    def counting(**kwargs):
        calls.append(kwargs["pixel_values"].shape[0])
        return original(**kwargs)

    monkeypatch.setattr(model, "get_image_features", counting)
    _score(scorer, np.stack([_checkerboard()] * 8))
    assert calls == [8]


def test_aspect_text_embeddings_are_computed_once_per_replica(monkeypatch):
    texts = []
    from deployments.runtime import tiny

    real_tokenizer = tiny.tiny_clip_tokenizer

    def recording_tokenizer():
        tokenizer = real_tokenizer()
        original_call = type(tokenizer).__call__

        class Recording(type(tokenizer)):
            def __call__(self, text, *args, **kwargs):
                texts.append(list(text))
                return original_call(self, text, *args, **kwargs)

        tokenizer.__class__ = Recording
        return tokenizer

    monkeypatch.setattr(tiny, "tiny_clip_tokenizer", recording_tokenizer)
    config = ScorerConfig(source="tiny")
    replica = ClipScorer.func_or_class(config, metrics=False)
    # At start: the aesthetic pair and every aspect's pair, in one call.
    assert len(texts) == 1 and len(texts[0]) == 2 * (1 + len(ASPECTS))
    assert config.aspects.lighting.positive in texts[0] and config.aspects.style.negative in texts[0]
    for _ in range(3):
        _score(replica, np.stack([_checkerboard()] * 2), prompt="a red fox")
    # Per request: only the prompt.
    assert texts[1:] == [["a red fox"]] * 3


def test_aspect_scores_follow_their_texts():
    """Swapping an aspect's texts turns its probability p into 1 - p."""
    base = ScorerConfig(source="tiny")
    pair = base.aspects.lighting
    swapped = base.model_copy(update={"aspects": base.aspects.model_copy(update={
        "lighting": pair.model_copy(update={"positive": pair.negative, "negative": pair.positive})})})
    images = np.stack([_checkerboard(), _flat(200)])
    normal = _score(ClipScorer.func_or_class(base, metrics=False), images)
    flipped = _score(ClipScorer.func_or_class(swapped, metrics=False), images)
    for a, b in zip(normal, flipped):
        assert a["aspects"]["lighting"] + b["aspects"]["lighting"] == pytest.approx(1.0, abs=1e-5)
        assert a["aspects"]["colors"] == pytest.approx(b["aspects"]["colors"], abs=1e-6)


# --- the LAION head --------------------------------------------------------------------------

def test_public_head_layout_and_keys():
    head = build_head([768, 1024, 128, 64, 16, 1])
    linears = [module for module in head if isinstance(module, torch.nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [i for i, module in enumerate(head) if isinstance(module, torch.nn.Linear)] == list(LINEAR_INDICES)
    assert [module.p for module in head if isinstance(module, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


def _pth_state(head) -> dict:
    return {f"layers.{key}": value for key, value in head.state_dict().items()}


def test_head_loads_from_safetensors_pth_and_folder(tmp_path):
    head = build_tiny_laion_head(32, seed=3)
    embedding = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    expected = head(embedding)
    safetensors_file = save_head(head, tmp_path / "head.safetensors")
    pth_file = tmp_path / "folder" / "sac+logos+ava1-l14-linearMSE.pth"
    pth_file.parent.mkdir()
    torch.save(_pth_state(head), pth_file)  # the public file's format: a state dict
    for source in (str(safetensors_file), str(pth_file), str(pth_file.parent)):
        loaded = load_head(LaionHeadConfig(source=source), source, embedding_width=32)
        assert torch.allclose(loaded(embedding), expected, atol=1e-6), source


def test_pth_holding_objects_is_refused(tmp_path):
    class Payload:  # unpickling this would run code the file chose; weights_only never does
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_head(LaionHeadConfig(source=str(path)), str(path), embedding_width=32)


def test_wrong_width_or_layout_is_a_clear_config_error(tmp_path):
    wide = save_head(build_head([768, 1024, 128, 64, 16, 1]), tmp_path / "l14.safetensors")
    with pytest.raises(ValueError, match=r"scorer\.laion: .* takes 768-wide .* gives 32-wide"):
        ClipScorer.func_or_class(ScorerConfig(source="tiny", laion=LaionHeadConfig(source=str(wide))))
    odd = tmp_path / "odd.pth"
    torch.save({"fc.weight": torch.zeros(1, 32)}, odd)
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor head"):
        load_head(LaionHeadConfig(source=str(odd)), str(odd), embedding_width=32)
    with pytest.raises(FileNotFoundError):
        load_head(LaionHeadConfig(source=str(tmp_path / "missing.pth")), str(tmp_path / "missing.pth"), 32)


def test_head_from_config_file_scores_like_the_tiny_head(scorer, tmp_path):
    folder = save_tiny("laion", tmp_path / "laion")
    from_file = ClipScorer.func_or_class(
        ScorerConfig(source="tiny", laion=LaionHeadConfig(source=str(folder / "laion-head.safetensors"))),
        metrics=False)
    images = np.stack([_checkerboard(), _flat(40)])
    assert [s["laion"] for s in _score(from_file, images)] == pytest.approx([s["laion"] for s in _score(scorer, images)], abs=1e-5)
    assert from_file.info()["laion_head"].endswith("laion-head.safetensors")


def test_laion_score_is_clipped_to_one_to_ten():
    head = build_tiny_laion_head(32)
    with torch.no_grad():
        head[-1].bias.fill_(50.0)
    assert head(torch.zeros(1, 32)).clamp(1, 10).item() == 10.0  # what the scorer applies


def test_laion_off_drops_the_score_and_its_weight(tmp_path):
    off = ClipScorer.func_or_class(ScorerConfig(source="tiny", laion=LaionHeadConfig(enabled=False)), metrics=False)
    scores = _score(off, np.stack([_checkerboard()]))[0]
    assert "laion" not in scores and off.gate_metrics == ("alignment", "aesthetic", "combined")
    assert scores["combined"] == pytest.approx((scores["aesthetic"] + scores["alignment"] / 100) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="not computed: \\['laion'\\]"):
        _score(off, np.stack([_checkerboard()]), weights={"laion": 1})


def test_laion_default_source_follows_the_clip_source():
    assert ScorerConfig(source="tiny").laion_source == "tiny"
    assert ScorerConfig().laion_source == "camenduru/improved-aesthetic-predictor"
    assert ScorerConfig().laion.filename == "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(ValidationError, match="filename must end in"):
        LaionHeadConfig(filename="head.bin")
    with pytest.raises(ValidationError, match="source must be"):
        LaionHeadConfig(source="not a source")


# --- the combined metric and the gate --------------------------------------------------------

def test_combined_is_the_weighted_mean_of_range_normalised_scores():
    scores = {"aesthetic": 0.8, "alignment": 30.0, "laion": 5.5}
    assert normalised("laion", 5.5) == pytest.approx(0.5) and normalised("alignment", 30.0) == pytest.approx(0.3)
    assert normalised("laion", 0.2) == 0.0 and normalised("laion", 12) == 1.0
    equal = combined_score(scores, CombinedWeights(aesthetic=1, alignment=1, laion=1))
    assert equal == pytest.approx((0.8 + 0.3 + 0.5) / 3)
    weighted = combined_score(scores, {"aesthetic": 1, "alignment": 0, "laion": 3})
    assert weighted == pytest.approx((0.8 + 3 * 0.5) / 4)
    assert combined_score({"aesthetic": 0.8}, {"aesthetic": 2, "laion": 0}) == pytest.approx(0.8)


def test_scorer_uses_the_given_weights(scorer):
    images = np.stack([_checkerboard()])
    only_laion = _score(scorer, images, weights=CombinedWeights(laion=1))[0]
    assert only_laion["combined"] == pytest.approx((only_laion["laion"] - 1) / 9, abs=1e-6)
    default = _score(scorer, images)[0]
    expected = (default["aesthetic"] + default["alignment"] / 100 + (default["laion"] - 1) / 9) / 3
    assert default["combined"] == pytest.approx(expected, abs=1e-6)


def test_weights_need_one_above_zero():
    with pytest.raises(ValidationError, match="at least one weight"):
        CombinedWeights()
    with pytest.raises(ValidationError):
        CombinedWeights(aesthetic=-1, laion=1)


def test_policy_metric_and_weights_must_be_computed():
    for policy in ({"metric": "laion", "threshold": 5}, {"metric": "combined", "weights": {"laion": 1}}):
        with pytest.raises(ValidationError, match="laion"):
            AppArgs.model_validate({"scorer": {"source": "tiny", "laion": {"enabled": False}}, "policy": policy})
    with pytest.raises(ValidationError, match="between 1 and 10; got 11"):
        QualityPolicy(metric="laion", threshold=11)
    assert AppArgs.model_validate({"policy": {"metric": "combined", "threshold": 0.4}}).gate_metrics() == (
        "alignment", "aesthetic", "laion", "combined")  # the default scorers: CLIP and its LAION head


def test_quality_gate_resolves_and_rejects_per_field():
    policy = QualityPolicy(metric="combined", threshold=0.4, weights=CombinedWeights(aesthetic=1, laion=2))
    every = tuple(SCORE_RANGES)
    assert quality_gate(None, None, None, policy, every) == ("combined", 0.4, policy.weights)
    request_weights = CombinedWeights(alignment=1)
    assert quality_gate("laion", 6, request_weights, policy, every) == ("laion", 6, request_weights)
    no_laion = ("alignment", "aesthetic", "combined")
    assert quality_gate("aesthetic", 0.5, None, QualityPolicy(), no_laion)[2] == CombinedWeights(aesthetic=1, alignment=1)
    assert default_weights(every) == CombinedWeights(aesthetic=1, alignment=1, laion=1)
    for args, field in (
        (("laion", 5, None, QualityPolicy(), no_laion), "quality_metric"),
        (("aesthetic", 0.5, CombinedWeights(laion=1), QualityPolicy(), no_laion), "quality_weights.laion"),
        (("combined", 1.5, None, QualityPolicy(), every), "quality_threshold"),
        (("laion", 0.5, None, QualityPolicy(), every), "quality_threshold"),
    ):
        with pytest.raises(RequestError) as error:
            quality_gate(*args)
        assert error.value.field == field


def test_choose_sorts_failing_candidates_by_the_chosen_metric():
    def candidate(seed, **scores):
        return Candidate(attempt=1, seed=seed, prompt="p", image=np.zeros((1, 1, 3), np.uint8), scores=scores, passed=False)

    candidates = [candidate(1, laion=3.0, combined=0.9), candidate(2, laion=7.0, combined=0.2),
                  candidate(3, laion=5.0, combined=0.5)]
    assert [c.seed for c in choose(candidates, 3, "laion")] == [2, 3, 1]
    assert [c.seed for c in choose(candidates, 2, "combined")] == [1, 3]
