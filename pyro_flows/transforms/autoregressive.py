"""Masked autoregressive flows: IAF (fast sampling), MAF (fast density) and spline autoregressive."""

__all__: list[str] = []
