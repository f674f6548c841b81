"""Continuous normalizing flows (neural ODE / FFJORD)."""

__all__: list[str] = []
