"""Prompt sets and templates for concepts, anchors, retain sets and paraphrases (data files plus loaders).

A leaf package: it imports nothing else of this project.
"""

from prompts.shapes import ShapesVocab, load_shapes_vocab

__all__ = ["ShapesVocab", "load_shapes_vocab"]
