"""Planar flows (Rezende & Mohamed 2015) with an exact inverse."""

__all__: list[str] = []
