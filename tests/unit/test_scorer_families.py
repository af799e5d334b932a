"""Scorer families (deployments/scoring/families): HPSv2.1's OpenCLIP checkpoint converted to a
transformers CLIPModel, PickScore's CLIPModel, both scoring through their real loading paths on tiny
models; the `scorers:` config, its checks and the deprecated `scorer:` block."""

import asyncio
import json
import math
import warnings

import numpy as np
import pytest
import torch

from deployments.config import CombinedWeights, ScorerEntry, ScoringConfig
from deployments.names import COMBINABLE, GATE_METRICS, SCORE_RANGES
from deployments.runtime.loading import resolve_placement
from deployments.runtime.tiny import build_tiny_clip
from deployments.scoring.clip_scorer import ClipScorer
from deployments.scoring.families import get_scorer_family
from deployments.scoring.families.hps import build_tiny_checkpoint
from deployments.scoring.openclip import (
    architecture,
    clip_config,
    converted_checked,
    expected_layout,
    to_openclip,
    to_transformers,
)
from serve_app.config import AppArgs, app_args_from_config

IMAGES = np.random.default_rng(0).integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
CPU = {"device": "cpu", "torch_threads": 1}


def _scores(entries, prompt="a red fox in the snow", weights=None):
    scorer = ClipScorer.func_or_class(ScoringConfig(scorers=tuple(entries)), metrics=False)
    return asyncio.run(scorer.score(IMAGES, prompt, weights=weights))


def _processor_folder(path):
    parts = build_tiny_clip()
    parts["tokenizer"].save_pretrained(path)
    parts["image_processor"].save_pretrained(path)
    return str(path)


# --- HPSv2.1: the published checkpoint's layout converts into the architecture used ----------

def test_published_hps_checkpoint_layout_loads_into_a_clip_model_on_the_meta_device():
    published = architecture("hpsv2.1-vit-h-14")
    shapes = published["state_dict"]
    assert len(shapes) == 686 and published["parameters"] == sum(math.prod(shape) for shape in shapes.values())
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = clip_config(published["config"])
    converted = converted_checked({"state_dict": state}, config, "HPS_v2.1_compressed.pt")
    layout = expected_layout(config)
    assert {key: tuple(value.shape) for key, value in converted.items()} == layout
    # ViT-H-14: 32 vision blocks of width 1280 (16 heads of 80), 24 text blocks of 1024, 1024-wide embeddings.
    assert layout["vision_model.encoder.layers.31.self_attn.q_proj.weight"] == (1280, 1280)
    assert layout["visual_projection.weight"] == (1024, 1280) and layout["text_projection.weight"] == (1024, 1024)
    assert config.vision_config.num_attention_heads == 16 and config.text_config.num_hidden_layers == 24


def test_a_checkpoint_of_another_shape_is_rejected_naming_the_keys():
    published = architecture("hpsv2.1-vit-h-14")
    state = {key: torch.empty(shape, device="meta") for key, shape in published["state_dict"].items()}
    state["visual.proj"] = torch.empty(1280, 768, device="meta")
    del state["ln_final.bias"]
    with pytest.raises(ValueError, match=r"missing \['text_model.final_layer_norm.bias'\].*visual_projection.weight"):
        converted_checked(state, clip_config(published["config"]), "other.pt")
    with pytest.raises(KeyError, match="attn_pool"):
        to_transformers({"visual.attn_pool.query": torch.empty(1)})


def test_openclip_layout_round_trips():
    model = build_tiny_clip()["model"]
    state = model.state_dict()
    back = to_transformers(to_openclip(state))
    assert set(back) == {key for key in state if not key.endswith("position_ids")}
    assert all(torch.equal(back[key], state[key]) for key in back)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_hps_scores_from_a_checkpoint_file_as_from_tiny(tmp_path, suffix):
    config, state = build_tiny_checkpoint()
    path = tmp_path / f"hps{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)  # HPSv2's training checkpoint shape
    else:
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    (tmp_path / "arch.json").write_text(json.dumps({"config": config}))
    options = {"processor": _processor_folder(tmp_path / "processor"), "architecture": str(tmp_path / "arch.json")}
    from_file = _scores([ScorerEntry(family="hps", source=str(path), device=CPU, options=options)])
    tiny = _scores([ScorerEntry(family="hps", source="tiny", device=CPU)])
    assert [s["hps"] for s in from_file] == pytest.approx([s["hps"] for s in tiny], abs=1e-5)
    assert all(SCORE_RANGES["hps"][0] <= s["hps"] <= SCORE_RANGES["hps"][1] for s in from_file)
    assert "alignment" not in from_file[0]


def test_saved_tiny_scorers_load_from_their_folders_as_from_tiny(tmp_path):
    from deployments.scoring.families import hps, pickscore
    from deployments.tiny import save_tiny

    folder = str(save_tiny("hps", tmp_path / "hps", seed=hps.TINY_SEED))
    entry = ScorerEntry(family="hps", source=folder, device=CPU,
                        options={"processor": folder, "architecture": f"{folder}/architecture.json"})
    assert _scores([entry])[0]["hps"] == pytest.approx(_scores([ScorerEntry(family="hps", source="tiny")])[0]["hps"])
    folder = str(save_tiny("pickscore", tmp_path / "pickscore", seed=pickscore.TINY_SEED))
    entry = ScorerEntry(family="pickscore", source=folder, device=CPU, options={"processor": folder})
    from_folder = _scores([entry])
    tiny = _scores([ScorerEntry(family="pickscore", source="tiny", device=CPU)])
    assert [s["pickscore"] for s in from_folder] == pytest.approx([s["pickscore"] for s in tiny], abs=1e-4)


# --- one scorer deployment, every family's metrics -------------------------------------------

def test_every_family_scores_in_one_call_and_a_preference_tower_can_serve_alignment():
    clip = ScorerEntry(family="clip", source="tiny", device=CPU, options={"laion": {"source": "tiny"}})
    hps = ScorerEntry(family="hps", source="tiny", device=CPU)
    pick = ScorerEntry(family="pickscore", source="tiny", device=CPU)
    every = _scores([clip, hps, pick], weights=CombinedWeights(hps=1, pickscore=1))
    assert {metric for metric in GATE_METRICS if metric in every[0]} == set(GATE_METRICS)
    for metric in GATE_METRICS:
        low, high = SCORE_RANGES[metric]
        assert low <= every[0][metric] <= high, metric
    expected = (every[0]["hps"] + every[0]["pickscore"] / 100) / 2
    assert every[0]["combined"] == pytest.approx(expected)
    # Alignment through HPS's CLIP-H tower: 100 x the same cosine its hps score is.
    no_clip_alignment = clip.model_copy(update={"options": {**clip.options, "alignment": False}})
    hps_aligned = hps.model_copy(update={"options": {"alignment": True}})
    shared = _scores([no_clip_alignment, hps_aligned])
    assert shared[0]["alignment"] == pytest.approx(100 * shared[0]["hps"], abs=1e-3)
    assert shared[0]["aesthetic"] == pytest.approx(every[0]["aesthetic"])


def test_names_define_each_metric_and_weight_once():
    assert tuple(SCORE_RANGES) == GATE_METRICS
    assert tuple(CombinedWeights.model_fields) == COMBINABLE
    metrics = {metric for name in ("clip", "hps", "pickscore")
               for metric in get_scorer_family(name).metrics(ScorerEntry(family=name, source="tiny"))}
    assert metrics | {"combined"} == set(GATE_METRICS)


# --- the config ------------------------------------------------------------------------------

def test_old_scorer_block_warns_naming_scorers_and_still_configures_the_clip_scorer():
    with pytest.warns(DeprecationWarning, match="scorers:"):
        args = AppArgs.model_validate({"scorer": {"source": "tiny", "laion": {"enabled": False},
                                                  "batching": {"enabled": True, "max_batch_images": 4}}})
    assert [(entry.family, entry.source) for entry in args.scorers] == [("clip", "tiny")]
    assert args.gate_metrics() == ("alignment", "aesthetic", "combined")
    assert args.scoring_config().batching.max_batch_images == 4


def test_scorers_config_rejects_what_cannot_run():
    tiny = {"source": "tiny"}
    cases = [
        ({"scorers": [{"family": "clip", **tiny}, {"family": "hps", **tiny, "options": {"alignment": True}}]},
         r"scorers\[1\] and scorers\[0\] both compute 'alignment'"),
        ({"scorers": [{"family": "clip", **tiny}], "policy": {"metric": "hps"}}, "policy.metric 'hps'"),
        ({"scorers": [{"family": "clip", **tiny}], "policy": {"metric": "combined", "weights": {"pickscore": 1}}},
         "policy.weights.pickscore must be 0"),
        ({"scorers": [{"family": "hps", **tiny, "options": {"filename": "x.pt", "colour": 1}}]},
         r"scorers\[0\]: options for scorer family 'hps'"),
        ({"scorers": [{"family": "nope", **tiny}]}, r"scorers\[0\]: unknown scorer family 'nope'"),
        ({"scorers": [{"family": "pickscore", **tiny, "enabled": False}]}, "at least one entry must be enabled"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            AppArgs.model_validate(config)


def test_profiles_list_every_family_and_pickscore_is_off_on_gpus_for_its_licence():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no profile uses the old block
        dev = app_args_from_config("configs/dev.yaml")
        single = app_args_from_config("configs/single-gpu.yaml")
    assert [entry.family for entry in dev.served_scorers] == ["clip", "hps", "pickscore"]
    assert all(entry.source == "tiny" for entry in dev.scorers)
    pick = next(entry for entry in single.scorers if entry.family == "pickscore")
    assert not pick.enabled and "none stated" in get_scorer_family("pickscore").licence
    assert "hps" in single.gate_metrics() and "pickscore" not in single.gate_metrics()
    assert resolve_placement(dev.scorers[1].device).device == "cpu"


def test_a_processor_source_downloads_its_tokenizer_and_image_processor_only():
    from deployments.runtime.weights import select_files

    listing = ["config.json", "merges.txt", "model.safetensors", "open_clip_pytorch_model.bin",
               "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert select_files(listing, "processor") == ["config.json", "merges.txt", "preprocessor_config.json",
                                                  "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert "model.safetensors" in select_files(listing, "transformers")
