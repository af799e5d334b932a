"""Scoring: the ClipScorer deployment, the LAION aesthetic head, pixel checks."""
