"""The Shapes world: a procedural image world with its own tiny CLIPs (and, later, generators).

Everything here is trained by this project's own code (``erase world train``) and shipped as small
safetensors files under ``pipelines/shapes/weights``.
"""

from pipelines.shapes.world import Attributes, ShapesWorld

__all__ = ["Attributes", "ShapesWorld"]
