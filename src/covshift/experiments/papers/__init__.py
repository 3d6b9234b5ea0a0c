"""Experiments from the BatchNorm and ICS literature (filled in by the papers' issue)."""
