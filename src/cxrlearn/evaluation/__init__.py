"""Evaluation: per-finding metrics on predictions."""
