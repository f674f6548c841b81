"""Residual flows (i-ResNet / Residual Flows) with a fixed-point inverse."""

__all__: list[str] = []
