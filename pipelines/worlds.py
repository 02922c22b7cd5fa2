"""The embedded worlds by name: the procedural image world behind each, for the trainers of its models.

``shapes`` (colours x shapes x fill styles, `pipelines.shapes`) and ``canvas`` (painting styles x objects,
`pipelines.canvas`). Each world object draws captioned images through the same interface (``attributes``,
``random_attributes``, ``draw``, ``draw_pool``, ``caption``, ``sample``).
"""

from __future__ import annotations

WORLDS = ("shapes", "canvas")


def check_world(name: str) -> str:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}: use one of {', '.join(WORLDS)}")
    return name


def make_world(name: str, resolution: int = 32):
    """A fresh world object (``ShapesWorld`` or ``CanvasWorld``) by name."""
    if check_world(name) == "canvas":
        from pipelines.canvas.world import CanvasWorld

        return CanvasWorld(resolution)
    from pipelines.shapes.world import ShapesWorld

    return ShapesWorld(resolution)
