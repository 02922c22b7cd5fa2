"""CLIP-based evaluators: how well a concept was erased and how much of the model was kept.

Import as ``from eval import zero_shot`` or ``import eval as erase_eval``: a bare ``import eval`` shadows the
builtin of the same name in the importing module.
"""
