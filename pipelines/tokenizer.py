"""The real CLIP tokenizer, built offline from the BPE merges file that ships inside the open-clip-torch wheel.

Stable Diffusion 1.x uses OpenAI's CLIP BPE (49,408 tokens, 77-token context). open_clip ships exactly that
merges list as ``bpe_simple_vocab_16e6.txt.gz``; this module turns it into the ``vocab.json``/``merges.txt``
pair that `transformers.CLIPTokenizer` reads, so prompts tokenize as in SD 1.x with no network.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
_N_MERGES = VOCAB_SIZE - 256 * 2 - 2  # byte tokens, byte+</w> tokens, and the two specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP BPE uses for raw bytes, in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes follow in byte order,
    shifted to code points from 256 upwards. This order fixes the ids of the first 512 tokens.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _read_merges() -> list[str]:
    data = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : 1 + _N_MERGES]  # line 0 is a version header
    if len(merges) != _N_MERGES:
        raise RuntimeError(
            f"open_clip's BPE file has {len(merges)} merges, expected {_N_MERGES}: reinstall open-clip-torch"
        )
    return merges


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer into ``directory``.

    The vocabulary order is the one CLIP was trained with: byte symbols, byte symbols ending a word
    (``</w>``), one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = _read_merges()
    symbols = _byte_alphabet()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def _load(directory: Path) -> CLIPTokenizer:
    # from_pretrained on a folder is the form that works in transformers 4 and 5 alike; the 4.x keyword
    # names vocab_file=/merges_file= are silently ignored by transformers 5 (see reference/ecosystem.md).
    return CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=MODEL_MAX_LENGTH, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


@cache
def _cached_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="erase-clip-tokenizer-") as tmp:
        tokenizer = _load(write_clip_tokenizer_files(tmp))
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP tokenizer with {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def clip_tokenizer() -> CLIPTokenizer:
    """The SD 1.x CLIP tokenizer (49,408 tokens, ``model_max_length=77``, padded with ``<|endoftext|>``).

    Built once per process from the open-clip-torch wheel; each call returns an independent copy.
    """
    import copy

    return copy.deepcopy(_cached_tokenizer())


# ----------------------------------------------------------------------------------------------------------------
# Prompts longer than a text encoder's context

_LOGGER = logging.getLogger("erase")
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"  # "...will result in indexing errors": untrue, we truncate
_WARNED: set[tuple[str, int, str]] = set()  # (prompt, limit, who) already warned about in this process
_SHOWN = 3


def t5_style_tokenizer(words: list[str], max_length: int | None = None):
    """A T5-style tokenizer for a closed vocabulary, built offline: SentencePiece's Unigram model over a fixed table
    (lower-cased, ``▁`` marking a word's start), ``</s>`` appended as T5 does.

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's own), then ``▁``, every letter alone and word-initial, then each
    of ``words`` (two letters or more) as one piece, so any lower-case English word tokenizes: as one piece when
    listed, by letters otherwise, never as ``<unk>``. Every build from the same words is the same tokenizer.

    Args:
        words (`list[str]`): the whole-word pieces, in table order.
        max_length (`int`, *optional*): the tokenizer's ``model_max_length`` (the T5 tokens a model is trained at).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    table = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    table += [(c, -3.0) for c in letters] + [("\u2581" + c, -3.0) for c in letters]
    table += [("\u2581" + w, -1.0) for w in words if len(w) > 1]
    tokenizer = Tokenizer(models.Unigram(table, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if max_length is not None:
        fast.model_max_length = max_length
    return fast


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Raise the given loggers to ERROR while the block runs (restored after), to drop warnings said better here."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def warn_if_truncated(prompts: list[str], tokenizer, limit: int | None, who: str) -> bool:
    """Warn (logger ``erase``) about each prompt longer than ``limit`` tokens (start and end tokens included), which
    ``who`` truncates: the warning names the prompt, its length and the words that are ignored. Each prompt is
    reported once per process. Returns whether any prompt is too long.

    Args:
        prompts (`list[str]`): the prompts.
        tokenizer: a transformers CLIP tokenizer (the pipeline's own, or `clip_tokenizer` for CLIP judges: every
            CLIP shares one BPE vocabulary).
        limit (`int`, *optional*): the context length; ``None`` checks nothing.
        who (`str`): what truncates, for the message (e.g. ``"the text encoder"``).
    """
    if not limit:
        return False
    too_long = []
    with quiet_loggers(TOKENIZER_LOGGER):
        for prompt in dict.fromkeys(prompts):
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            if len(ids) + 2 > limit:
                too_long.append((prompt, len(ids) + 2, ids[limit - 2 :]))
    fresh = [entry for entry in too_long if (entry[0], limit, who) not in _WARNED]
    for prompt, n, dropped in fresh[:_SHOWN]:
        ignored = " ".join(tokenizer.decode(dropped).replace("</w>", " ").split())
        ignored = ignored if len(ignored) <= 60 else "..." + ignored[-57:]
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        _LOGGER.warning(
            f"prompt {shown!r} is {n} tokens, longer than the {limit}-token context of {who}: it is truncated and "
            f"{ignored!r} is ignored; shorten it to change that"
        )
    if len(fresh) > _SHOWN:
        _LOGGER.warning(f"{len(fresh) - _SHOWN} more prompts are longer than the {limit}-token context of {who}")
    _WARNED.update((prompt, limit, who) for prompt, _, _ in fresh)
    return bool(too_long)
