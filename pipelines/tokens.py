"""A learned embedding in place of one token: the text-side tool of textual inversion, adversarial prompts (`eval
.attacks`) and adversarial training (`erase.training.adversarial`)."""

from __future__ import annotations

import torch


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


class TokenInjection:
    """Replace the input embedding of one placeholder token in every text encoder of a pipeline.

    A forward hook on each encoder's token-embedding table (composition: nothing is patched) swaps the rows of the
    placeholder for ``values[i]`` (encoder ``i``): a ``[D]`` vector at every occurrence (textual inversion), or
    ``[n, D]`` rows, one per occurrence in row-major order (per-case adversarial prefixes). Gradients flow into the
    values, so the pipeline's own ``encode_prompt`` serves training and sampling alike.

    Args:
        pipe: the pipeline.
        token_id (`int`): the placeholder's token id (the same in both SDXL tokenizers).
    """

    def __init__(self, pipe, token_id: int):
        self.encoders = text_encoders(pipe)
        self.token_id = token_id
        self.values: list[torch.Tensor] | None = None
        self._handles = []

    def tables(self) -> list[torch.Tensor]:
        """Each encoder's token-embedding weight ``[V, D]``."""
        return [e.get_input_embeddings().weight for e in self.encoders]

    def __enter__(self) -> TokenInjection:
        for i, encoder in enumerate(self.encoders):
            table = encoder.get_input_embeddings()
            self._handles.append(table.register_forward_hook(lambda m, args, out, i=i: self._swap(i, args[0], out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _swap(self, i: int, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mask = ids == self.token_id
        if self.values is None or not bool(mask.any()):
            return out
        value = self.values[i].to(out.device, out.dtype)
        if value.ndim == 1:
            return torch.where(mask[..., None], value, out)
        if value.shape[0] != int(mask.sum()):
            raise RuntimeError(f"{int(mask.sum())} placeholder positions but {value.shape[0]} injected rows")
        return out.masked_scatter(mask[..., None].expand_as(out), value)


def token_id_of(tokenizer, word: str, flag: str = "--placeholder") -> int:
    """The id of a word that the tokenizer keeps as one token; a one-line error naming ``flag`` otherwise."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"{flag.lstrip('-')} {word!r} is {len(ids)} tokens for this tokenizer: pass a one-token {flag}"
        )
    return ids[0]


def word_embedding(tokenizer, table: torch.Tensor, word: str) -> torch.Tensor:
    """The mean input embedding of ``word``'s tokens in ``table`` (the usual textual-inversion initializer)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return table.detach()[ids].float().mean(0)
