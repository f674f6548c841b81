"""Coupling flows: RealNVP affine coupling and rational-quadratic spline coupling."""

__all__: list[str] = []
