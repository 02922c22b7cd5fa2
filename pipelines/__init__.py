"""Load base models (diffusers pipelines, GAN generators, the Shapes world) and apply patches to them.

``pipelines.load(name)`` returns a diffusers pipeline ("shapes" or a local folder / single file, see
`pipelines.loading.load_pipeline`); ``pipelines.load_gan(name)`` returns a GAN generator module.
Imports are deferred so that ``import pipelines`` stays cheap.
"""

from __future__ import annotations


def load(model: str = "shapes", **kwargs):
    """Load a diffusers pipeline: ``"shapes"`` (the Shapes world's, shipped) or a local folder / single file."""
    from pipelines.loading import load_pipeline

    return load_pipeline(model, **kwargs)


def load_gan(name: str = "shapes"):
    """Load a GAN generator: ``"shapes"`` (the Shapes world's, shipped) or a path to a Shapes GAN file."""
    from pathlib import Path

    from pipelines.shapes.clip import WEIGHTS_DIR
    from pipelines.shapes.gan import load_generator_file

    if name == "shapes":
        path = WEIGHTS_DIR / "gan_shapes.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"the shipped Shapes GAN {path} is missing: run 'erase world train --only gan'")
        return load_generator_file(path)
    if not Path(name).is_file():
        raise FileNotFoundError(f"unknown GAN {name!r}: use 'shapes' or the path of a Shapes GAN .safetensors file")
    return load_generator_file(name)
