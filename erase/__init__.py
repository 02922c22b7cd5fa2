"""erase: remove concepts from image generators.

Trainers write *patches* (``erase.patch``) that ``pipelines`` applies to diffusers pipelines and GAN
generators; ``eval`` measures what was erased and what was kept. This module imports nothing eagerly, so
that ``pipelines`` can import ``erase.patch`` without a cycle.
"""

__version__ = "0.1.0"
