"""The Shapes Canvas world: 24 painting styles (made-up artists) x 10 objects, with its own tiny CLIPs, a style and
object classifier and a tiny `StableDiffusionPipeline`, trained by ``erase world train --world canvas`` and shipped
as safetensors under ``pipelines/canvas/weights``."""

from pathlib import Path

from pipelines.canvas.world import CanvasAttributes, CanvasWorld

WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = ["WEIGHTS_DIR", "CanvasAttributes", "CanvasWorld"]
