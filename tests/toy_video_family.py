"""A video family defined outside genserve's package, named in config by import path
(`family: tests.toy_video_family:FAMILY`): the test that a video family, and a request parameter of
its own, need no product file changed (tests/toy_family.py is its image counterpart).

It is LTX-Video's tiny pipeline with LTX's parameters and one of its own, `fade`: the video darkens
frame by frame, its last frame `fade` of the way to black.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from deployments.families.ltx import LoadedLtx, LtxFamily, LtxParams


class ToyVideoParams(LtxParams):
    fade: float = Field(0.0, ge=0, le=1, description="How far the last frame fades to black (0: not at all).")


class LoadedToyVideo(LoadedLtx):
    def __call__(self, params, image, generator, callback):
        frames = super().__call__(params, image, generator, callback)
        weights = 1.0 - self.request_params(params).fade * np.linspace(0.0, 1.0, len(frames))
        return frames * weights[:, None, None, None]


class ToyVideoFamily(LtxFamily):
    name = "toy-video"
    description = "A toy video family from the test folder: tiny LTX-Video whose frames fade to black."
    Params = ToyVideoParams
    loaded_class = LoadedToyVideo


FAMILY = ToyVideoFamily()
