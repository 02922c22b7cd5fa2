"""A learned embedding in place of one token: the text-side tool of textual inversion, adversarial prompts (`eval
.attacks`) and adversarial training (`erase.training.adversarial`).

Every text encoder of a pipeline reads the prompt with its own tokenizer: SD 1.x/2.x one CLIP, SDXL two CLIPs that
share one vocabulary, SD3 two CLIPs and a T5, Flux a CLIP (pooled vector only) and a T5. A placeholder word is one
token in each of them, with an id per tokenizer (`placeholder_ids`), and the injected embedding is one vector per
encoder, of that encoder's width.
"""

from __future__ import annotations

import torch

_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
# Words tried, in order, for a placeholder when the configured one is not one token for every tokenizer (a T5 with its
# own vocabulary): rare words first, then single letters (one piece in SentencePiece vocabularies).
PLACEHOLDER_FALLBACKS = ("sks", "zzz", "xyz", "q", "x", "z", "j")


def encoders_and_tokenizers(pipe) -> list[tuple[torch.nn.Module, object]]:
    """Each text encoder of ``pipe`` with the tokenizer that reads its prompt (SD3's ``text_encoder_3`` included when
    the pipeline has one)."""
    pairs = []
    for encoder_name, tokenizer_name in _ENCODERS:
        encoder = getattr(pipe, encoder_name, None)
        if encoder is not None:
            pairs.append((encoder, getattr(pipe, tokenizer_name, None) or pipe.tokenizer))
    return pairs


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [e for e, _ in encoders_and_tokenizers(pipe)]


def text_tokenizers(pipe) -> list:
    return [t for _, t in encoders_and_tokenizers(pipe)]


def token_embedding(encoder) -> torch.nn.Module:
    """The embedding table an encoder's forward reads token ids through: CLIP's ``get_input_embeddings()``; a T5
    encoder's ``encoder.embed_tokens`` (in transformers 5 a module of its own beside ``shared``, whose weight it
    ties; a hook on ``shared`` would never fire)."""
    stack = getattr(encoder, "encoder", None)
    inner = getattr(stack, "embed_tokens", None) if isinstance(stack, torch.nn.Module) else None
    return inner if isinstance(inner, torch.nn.Embedding) else encoder.get_input_embeddings()


class TokenInjection:
    """Replace the input embedding of one placeholder token in every text encoder of a pipeline.

    A forward hook on each encoder's token-embedding table (composition: nothing is patched) swaps the rows of the
    placeholder for ``values[i]`` (encoder ``i``): a ``[D]`` vector at every occurrence (textual inversion), or
    ``[n, D]`` rows, one per occurrence in row-major order (per-case adversarial prefixes). Gradients flow into the
    values, so the pipeline's own ``encode_prompt`` serves training and sampling alike.

    Args:
        pipe: the pipeline.
        token_id (`int` or `list[int]`): the placeholder's token id in each encoder's tokenizer (`placeholder_ids`);
            one ``int`` for all of them when they share a vocabulary (SD 1.x/2.x, SDXL).
    """

    def __init__(self, pipe, token_id: int | list[int]):
        self.encoders = text_encoders(pipe)
        ids = [token_id] * len(self.encoders) if isinstance(token_id, int) else list(token_id)
        if len(ids) != len(self.encoders):
            raise ValueError(f"{len(ids)} placeholder ids for {len(self.encoders)} text encoders")
        self.token_ids = ids
        self.values: list[torch.Tensor] | None = None
        self._handles = []

    def tables(self) -> list[torch.Tensor]:
        """Each encoder's token-embedding weight ``[V, D]``."""
        return [token_embedding(e).weight for e in self.encoders]

    def __enter__(self) -> TokenInjection:
        for i, encoder in enumerate(self.encoders):
            table = token_embedding(encoder)
            self._handles.append(table.register_forward_hook(lambda m, args, out, i=i: self._swap(i, args[0], out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _swap(self, i: int, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mask = ids == self.token_ids[i]
        if self.values is None or not bool(mask.any()):
            return out
        value = self.values[i].to(out.device, out.dtype)
        if value.ndim == 1:
            return torch.where(mask[..., None], value, out)
        if value.shape[0] != int(mask.sum()):
            raise RuntimeError(f"{int(mask.sum())} placeholder positions but {value.shape[0]} injected rows")
        return out.masked_scatter(mask[..., None].expand_as(out), value)


def placeholder_ids(pipe, word: str, flag: str = "--placeholder") -> list[int]:
    """The id of ``word`` in each encoder's tokenizer (`encoders_and_tokenizers`); a one-line error naming ``flag``
    and the tokenizer when it is not one token in one of them."""
    ids = []
    for encoder, tokenizer in encoders_and_tokenizers(pipe):
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(
                f"{flag.lstrip('-')} {word!r} is {len(pieces)} tokens for the {type(tokenizer).__name__} of "
                f"{type(encoder).__name__}: pass a one-token {flag} (one token for every text encoder)"
            )
        ids.append(pieces[0])
    return ids


def one_token_word(pipe, avoid: list[str] = ()) -> str:
    """The first of `PLACEHOLDER_FALLBACKS` that is one token for every tokenizer of ``pipe`` and not a word of
    ``avoid`` (the prompts it will be put in): what a placeholder left unset becomes (``sks`` on CLIP-only models;
    on a model whose tokenizers differ, a T5 beside CLIP, the first that every one keeps whole). The first fallback
    when none is (its use then fails with `placeholder_ids`' one-line error)."""
    words = {w.lower() for text in avoid for w in text.split()}
    for word in PLACEHOLDER_FALLBACKS:
        if word.lower() in words:
            continue
        try:
            placeholder_ids(pipe, word)
        except ValueError:
            continue
        return word
    return PLACEHOLDER_FALLBACKS[0]


def word_embedding(tokenizer, table: torch.Tensor, word: str) -> torch.Tensor:
    """The mean input embedding of ``word``'s tokens in ``table`` (the usual textual-inversion initializer)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return table.detach()[ids].float().mean(0)


def word_embeddings(pipe, injection: TokenInjection, word: str) -> list[torch.Tensor]:
    """`word_embedding` of ``word`` in every encoder's table, each read by its own tokenizer."""
    return [word_embedding(tok, table, word) for tok, table in zip(text_tokenizers(pipe), injection.tables())]
