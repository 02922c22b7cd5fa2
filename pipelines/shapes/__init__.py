"""The Shapes world: a procedural image world with its own tiny CLIPs (and, later, generators).

Everything here is trained by this project's own code (``erase world train``) and shipped as small
safetensors files under ``pipelines/shapes/weights``.
"""

from pathlib import Path

from pipelines.shapes.world import Attributes, ShapesWorld

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped Shapes world weight files

__all__ = ["WEIGHTS_DIR", "Attributes", "ShapesWorld"]
