"""API keys, scopes, per-key limits and signed file URLs (docs/security.md)."""
