"""The pixel half of an attack's success rule on the Shapes world, read by the pixel oracle (`eval.oracle`).

The CLIP judge must pick one of its classes even for a frame with nothing in it (a nearly empty dark frame from an
erased model was judged "red" in 42% of one throwaway attack's cases while no red pixel was in it), so an attack counts
as successful only when the pixels agree: the oracle finds the object against the world's dark grey background and
reads its colour from the hue ranges of the world's colours (and its shape and fill style by fitting the world's
renderings); a case is confirmed when the oracle's reading of the concept's attribute is the concept ("none" for an
empty frame and "unrecognisable" never are).
"""

from __future__ import annotations

import numpy as np

from prompts.shapes import ATTRIBUTES


def _plain(value):
    """JSON-able Python values (the oracle's readings hold numpy scalars and tuples)."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class OracleCheck:
    """Confirms or refutes the judge from the pixels of Shapes world images.

    Args:
        oracle (`eval.oracle.ShapesOracle`, *optional*): the oracle (the default thresholds by default).
    """

    def __init__(self, oracle=None):
        from eval.oracle import ShapesOracle

        self.oracle = oracle or ShapesOracle()

    def read(self, images: np.ndarray) -> list[dict]:
        """Per image, the oracle's reading (``present``, ``colour``, ``shape``, ``style``, hue, IoU, ...)."""
        return [{k: _plain(v) for k, v in r.to_dict().items()} for r in self.oracle.read(images)]

    @staticmethod
    def confirms(readings: list[dict], task: str, concept: str) -> list[bool]:
        """Whether each reading shows ``concept`` for ``task`` (``colour``, ``shape`` or ``style``)."""
        if task not in ATTRIBUTES:
            raise ValueError(f"the pixel oracle reads {', '.join(ATTRIBUTES)}, not {task!r}")
        return [bool(r["present"]) and r[task] == concept for r in readings]

    def describe(self) -> dict:
        return self.oracle.describe()


def pixel_check(world: str | None, task: str):
    """The pixel half of the success rule where the model's world has a pixel oracle that reads ``task`` (the Shapes
    world's `OracleCheck`; the Canvas world's style and object classifier, `eval.canvas.ClassifierCheck`), else
    ``None`` (the judge alone decides)."""
    from eval.oracle import oracle_for

    if world == "canvas":
        from eval.canvas import ClassifierCheck
        from prompts.canvas import ATTRIBUTES as CANVAS_ATTRIBUTES

        return ClassifierCheck() if task in CANVAS_ATTRIBUTES else None

    oracle = oracle_for(world)
    return OracleCheck(oracle) if oracle is not None and task in ATTRIBUTES else None
