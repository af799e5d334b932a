"""Videos are scored (issue 28, item 5): sampled frames scored for alignment and preference by the
real tiny scorers, the temporal consistency of the frames, the quality gate on video requests; over
POST /v1/videos in one process (a toy video family whose `fade` darkens the later frames)."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.config import ScorerEntry, ScoringConfig, VideoModelConfig
from deployments.scoring.clip_scorer import ClipScorer
from deployments.video_generator import VideoGenerator, sample_indices

TOY = VideoModelConfig(id="toy-video", family="tests.toy_video_family:FAMILY", source="tiny", default_width=96,
                       default_height=64, default_num_frames=9, default_steps=1, warmup={"default_shape": False})
CPU = {"device": "cpu", "torch_threads": 1}
SCORERS = [{"family": "clip", "source": "tiny", "device": CPU, "options": {"laion": {"source": "tiny"}}},
           {"family": "hps", "source": "tiny", "device": CPU}, {"family": "pickscore", "source": "tiny", "device": CPU}]


@pytest.fixture(scope="module")
def client():
    from serve_app.api.app import build_api
    from tests.fakes import FakeGenerator, fake_services
    from tests.helpers import LOOPBACK, app_settings

    settings = app_settings(video_models=[TOY.model_dump()], scorers=SCORERS)
    images = FakeGenerator()
    images.info = lambda: {"source": "fake"}
    scorer = ClipScorer.func_or_class(ScoringConfig(scorers=tuple(ScorerEntry(**entry) for entry in SCORERS)),
                                      metrics=False)
    app = build_api()
    app.state.services = fake_services(settings, generator=images, scorer=scorer,
                                       video_generators={TOY.id: VideoGenerator.func_or_class(TOY, metrics=False)})
    return TestClient(app, client=LOOPBACK)


def test_sampled_frames_are_evenly_spaced_first_and_last_included():
    assert sample_indices(9, 4) == [0, 3, 5, 8] and sample_indices(3, 4) == [0, 1, 2]
    assert sample_indices(9, 1) == [4] and sample_indices(9, 0) == []


def test_a_video_response_carries_frame_scores_and_temporal_consistency(client):
    body = {"prompt": "a lantern", "seed": 4, "output_format": "gif", "quality_metric": "hps",
            "quality_threshold": 0.0}
    plain = client.post("/v1/videos", json=body)
    assert plain.status_code == 200, plain.text
    scores = plain.json()["scores"]
    assert scores["sampled_frames"] == [0, 3, 5, 8] and len(scores["frames"]) == 4
    for frame in scores["frames"]:
        assert {"alignment", "aesthetic", "laion", "hps", "pickscore", "combined"} <= set(frame)
    assert scores["mean"]["hps"] == pytest.approx(np.mean([frame["hps"] for frame in scores["frames"]]))
    assert scores["quality_metric"] == "hps" and scores["passed"] is True
    assert "score" in plain.json()["timings"]
    # Fading the later frames to black makes them less alike: the consistency drops.
    faded = client.post("/v1/videos", json={**body, "fade": 1.0, "quality_threshold": 1.0}).json()["scores"]
    assert -1 <= faded["temporal_consistency"] < scores["temporal_consistency"] <= 1
    assert faded["passed"] is False  # hps 1.0 is above any real score: the gate reports, the video is returned


def test_a_video_gate_needs_a_prompt_and_a_computed_metric(client):
    from tests.helpers import image_b64

    refused = client.post("/v1/videos", json={"image": image_b64(), "quality_threshold": 0.5})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "quality_threshold"]
    refused = client.post("/v1/videos", json={"prompt": "a lantern", "quality_metric": "hps", "quality_threshold": 2})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "quality_threshold"]
