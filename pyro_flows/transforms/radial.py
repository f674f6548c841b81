"""Radial flows (Rezende & Mohamed 2015) with a closed-form inverse."""

__all__: list[str] = []
