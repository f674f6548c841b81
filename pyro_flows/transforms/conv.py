"""Invertible and emerging convolutions on (C, H, W) events, and the squeeze (space-to-depth) layer."""

__all__: list[str] = []
