"""Evaluation: Inception features and references, scores during training, sweeps and their plots.

Rule: turns images (files or generated) into the numbers the papers report; the arithmetic of
the scores is in modules/core/metrics.py.
"""
