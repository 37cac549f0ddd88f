"""Parallel layout: size rules (validated once, up front) and pure sharding helpers."""
