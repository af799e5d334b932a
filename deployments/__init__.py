"""Ray Serve deployments, one model family per module.

Heavy libraries (torch, diffusers, transformers) are imported inside the functions and
constructors that need them, so importing a deployment module (as the application builder
and the ingress do) stays cheap.
"""
