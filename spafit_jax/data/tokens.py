"""Tokenisation: checked examples -> padded int32 token ids, cached on disk.

One batched call of the caller's fast tokenizer per chunk of examples; the flat ids are cached as
``.npz`` keyed by the texts, the tokenizer and ``max_length`` (a ``datasets`` ``.map`` cache would
need every source turned into an on-disk Dataset first, and hashes the tokenizer by pickling it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from spafit_jax.errors import DataError

_CACHE_VERSION = 1
_TOKENIZE_CHUNK = 8192


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """Checked, untokenised examples of one split (labels int32, or float32 for regression)."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts_a)


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """Tokenised split.

    ``input_ids`` / ``token_type_ids`` int32 [N, max_length] (padded with the pad id / 0),
    ``lengths`` int32 [N] (tokens incl. special tokens), ``labels`` int32 or float32 [N].
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])


def cache_dir() -> Path:
    """Token cache folder: ``$SPAFIT_CACHE`` or ``~/.cache/spafit_jax``."""
    return Path(os.environ.get("SPAFIT_CACHE") or Path.home() / ".cache" / "spafit_jax")


def _cache_key(tokenizer: Any, ex: Examples, max_length: int, pad_id: int) -> str:
    h = hashlib.sha256()
    ident = (_CACHE_VERSION, str(getattr(tokenizer, "name_or_path", "")),
             _vocab_size(tokenizer), int(max_length), int(pad_id), ex.texts_b is not None)
    h.update(repr(ident).encode())
    for text in itertools.chain(ex.texts_a, ex.texts_b or ()):
        h.update(text.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", 0))


def _tokenize(tokenizer: Any, ex: Examples, max_length: int):
    """Flat int32 ids and token types of all examples, plus lengths (batched calls)."""
    kw = {"truncation": True, "max_length": max_length, "return_attention_mask": False}
    ids, types = [], []
    for i in range(0, len(ex), _TOKENIZE_CHUNK):
        a = ex.texts_a[i:i + _TOKENIZE_CHUNK]
        out = (tokenizer(a, ex.texts_b[i:i + _TOKENIZE_CHUNK], **kw) if ex.texts_b is not None
               else tokenizer(a, **kw))
        rows = out["input_ids"]
        ids.extend(rows)
        types.extend(out.get("token_type_ids") or [[0] * len(r) for r in rows])
    lengths = np.asarray([len(r) for r in ids], np.int32)
    if len(lengths) and lengths.max() > max_length:
        raise DataError(f"tokenizer returned {lengths.max()} tokens > max_length {max_length}; "
                        "use a tokenizer that supports truncation")
    total = int(lengths.sum())
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids), np.int32, total)
    flat_tt = np.fromiter(itertools.chain.from_iterable(types), np.int32, total)
    return flat_ids, flat_tt, lengths


def encode(tokenizer: Any, ex: Examples, *, max_length: int, cache: bool = True) -> Encoded:
    """Tokenise ``ex`` (batched, truncated to ``max_length``) into a padded ``Encoded``.

    Results are cached as ``.npz`` under ``cache_dir()``, keyed by the texts, the tokenizer's
    name_or_path and vocabulary size, and ``max_length``.
    """
    if int(max_length) < 2:
        raise DataError(f"max_length {max_length} is too small; set data.max_length >= 8")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    path = cache_dir() / f"tokens-{_cache_key(tokenizer, ex, max_length, pad_id)}.npz"
    flat = None
    if cache and path.is_file():
        try:
            with np.load(path) as z:
                flat = (z["ids"], z["types"], z["lengths"])
        except (OSError, KeyError, ValueError):
            flat = None
    if flat is None or len(flat[2]) != len(ex):
        flat = _tokenize(tokenizer, ex, max_length)
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, ids=flat[0], types=flat[1], lengths=flat[2])
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache only costs time
    flat_ids, flat_tt, lengths = flat
    mask = np.arange(max_length)[None, :] < lengths[:, None]
    input_ids = np.full((len(lengths), max_length), pad_id, np.int32)
    token_type_ids = np.zeros((len(lengths), max_length), np.int32)
    input_ids[mask] = flat_ids
    token_type_ids[mask] = flat_tt
    return Encoded(input_ids, token_type_ids, lengths.astype(np.int32), ex.labels)


def check_texts(texts: Any, name: str = "texts") -> list[str]:
    """`texts` as a list of strings: a list (or tuple, or other sequence) of str, or one str as one text.
    Anything else (a number, None, a list holding a non-string, a bytes object) is a one-line DataError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__len__") or not hasattr(texts, "__iter__") \
            or isinstance(texts, dict):
        raise DataError(f"{name} must be a list of strings (or one string), got {type(texts).__name__}; pass "
                        f"[text, ...]")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise DataError(f"{name}[{i}] is {type(t).__name__} {t!r:.40}, not a string; pass text (str) only")
    return out
