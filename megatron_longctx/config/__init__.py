"""Typed experiment configuration: dataclasses, YAML recipes, dotted command-line overrides."""
