"""Frozen-encoder features computed once and served from disk (see ``cache.py``)."""

from captioner.features.cache import FeatureCache, cache_key, cached_features

__all__ = ["FeatureCache", "cache_key", "cached_features"]
