"""Sylvester flows (van den Berg et al. 2018): orthogonal, Householder and triangular variants."""

__all__: list[str] = []
