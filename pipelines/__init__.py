"""Load base models (diffusers pipelines, GAN generators, the Shapes world) and apply patches to them.

``pipelines.load(name)`` returns a diffusers pipeline ("shapes" or a local folder / single file, see
`pipelines.loading.load_pipeline`); ``pipelines.load_generator(spec)`` returns a GAN behind the protocol of
`pipelines.gan.GanGenerator` and ``pipelines.load_gan(spec)`` its module.
Imports are deferred so that ``import pipelines`` stays cheap.
"""

from __future__ import annotations


def load(model: str = "shapes", **kwargs):
    """Load a diffusers pipeline: ``"shapes"`` (the Shapes world's, shipped) or a local folder / single file."""
    from pipelines.loading import load_pipeline

    return load_pipeline(model, **kwargs)


def load_gan(name: str = "shapes", **kwargs):
    """Load a GAN generator module: ``"shapes"`` (the Shapes world's, shipped), a Shapes GAN file, or any spec of
    `pipelines.gan.load_generator` (keyword arguments are passed on). For the adapter (latents, pixel range,
    mapping/synthesis split, layer groups) use `load_generator`."""
    return load_generator(name, **kwargs).module


def load_generator(spec: str = "shapes", **kwargs):
    """A `pipelines.gan.GanGenerator` from one string (see `pipelines.gan.load_generator`)."""
    from pipelines.gan import load_generator as _load

    return _load(spec, **kwargs)
