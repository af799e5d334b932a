"""Ray Serve deployments and the model runtime under them.

- `families/`: the model family registry (one module per family) and `image_generator`, the one
  generic deployment that serves any image family;
- `enhancer/`, `scoring/`, `video/`: the other deployments;
- `runtime/`: loading, LoRA, progress, metrics and the messages passed between deployments.

Heavy libraries (torch, diffusers, transformers) are imported inside the functions and
constructors that need them, so importing a deployment module (as the application builder
and the ingress do) stays cheap.
"""
