"""Continued pretraining stage (see issue: resize, phase 1, phase 2)."""
