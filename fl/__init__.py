"""Bonsai's core: models, data, config, kernels, pruning, aggregation, wire format.

This package knows nothing of Flower's app objects and imports nothing from
``clients``, ``server`` or ``strategies``.
"""
