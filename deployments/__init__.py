"""Ray Serve deployments and the model runtime under them.

- `config`, `names`: model-side config as plain data, and the names defined once;
- `families/`: the image and video family registries (one module per family), which check and
  resolve config entries;
- `generator_base`, `image_generator`, `video_generator`: the generic generator deployments that
  serve any family's entry;
- `enhancer/`, `scoring/`, `video/`: the other deployments and video encoding;
- `lora_registry`: LoRA files and hub entries matched to families;
- `runtime/`: loading, LoRA, progress, metrics, acceleration, tiny building blocks, and the
  messages passed between deployments; `tiny`: every registry's tiny model, saved.

Nothing here imports `serve_app`, and no two sibling modules import each other. Heavy libraries
(torch, diffusers, transformers) are imported inside the functions and constructors that need
them, so importing a deployment module (as the application builder and the ingress do) stays cheap.
"""
