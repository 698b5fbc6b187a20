"""Text and VQA data (bpfree.data.text / .vqa): the real tweets and easy-VQA files, csv/jsonl of the
user's own on generated files, dynamic padding, the tokenised cache, and every bad-input case."""

from __future__ import annotations

import collections
import csv
import json

import pytest
import torch

pytest.importorskip("transformers")

from bpfree import data  # noqa: E402
from bpfree.data.text import trim_padding  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny transformers: one intra-op thread (two threads spin against each other on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenized"))


def write_csv(path, rows, columns=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def reviews(n=40):
    words = ["good", "bad", "fine", "awful", "great movie", "not good at all, really, a long long review"]
    return [{"text": words[i % len(words)] + f" {i}", "label": ["pos", "neg"][i % 2]} for i in range(n)]


def test_tweets_real_file(cache):
    ds = data.load("tweets", cache_dir=cache)
    y = torch.cat([ds.train.y, ds.val.y, ds.test.y])
    assert collections.Counter(y.tolist()) == {0: 16186, 1: 15018, 2: 6954}  # negative, neutral, positive
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30908, 3434, 3816)
    assert ds.train.x.shape == (30908, 2, 64) and ds.num_classes == 3
    lengths = ds.train.x[:, 1].sum(dim=1).float()
    assert 30 <= float(lengths.median()) <= 35  # MiniLM tokens incl. [CLS]/[SEP]: median 33
    again = data.load("tweets", cache_dir=cache, seed=1)
    assert torch.equal(again.test.x, ds.test.x)  # the test split is fixed
    assert not torch.equal(again.val.y, ds.val.y)  # validation follows data.seed


def test_dynamic_padding_trims_each_batch_to_its_longest_sequence(tmp_path, cache):
    ds = data.load("csv", path=write_csv(tmp_path / "r.csv", reviews()), max_length=32, cache_dir=cache)
    assert ds.train.x.shape[2] == 32
    for x, y in data.batches(ds.train, 4, generator=torch.Generator().manual_seed(0)):
        assert x.shape[2] == int(x[:, 1].sum(dim=1).max()) < 32
        assert torch.all(x[:, 1, -1].sum() >= 1)
    x = torch.zeros(2, 2, 6, dtype=torch.long)
    x[0, 1, :3] = 1
    x[1, 1, :5] = 1
    y = torch.zeros(2, 5, dtype=torch.long)
    tx, ty = trim_padding(x, y)
    assert tx.shape == (2, 2, 5) and ty.shape == (2, 4)


def test_csv_and_jsonl_agree_and_cache_is_keyed(tmp_path, cache):
    rows = reviews()
    c = data.load("csv", path=write_csv(tmp_path / "r.csv", rows), max_length=16, cache_dir=str(tmp_path / "c"))
    jl = tmp_path / "r.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    j = data.load("jsonl", path=str(jl), max_length=16, cache_dir=str(tmp_path / "c"))
    assert torch.equal(c.train.x, j.train.x) and torch.equal(c.test.y, j.test.y)
    assert c.num_classes == 2 and len(c.test) == 4  # fixed 10% test split
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2  # the file's bytes are part of the key
    data.load("csv", path=str(tmp_path / "r.csv"), max_length=24, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").glob("*.pt"))) == 3  # so is max_length


def test_declared_labels_order_and_text_pairs(tmp_path, cache):
    rows = [{"a": f"premise {i}", "b": f"hypothesis {i}", "y": ["no", "yes", "maybe"][i % 3]} for i in range(30)]
    path = write_csv(tmp_path / "p.csv", rows, columns=("a", "b", "y"))
    ds = data.load("csv", path=path, text=["a", "b"], label="y", labels=["yes", "no", "maybe"], max_length=24,
                   cache_dir=cache, val_fraction=0.0)
    y = torch.cat([ds.train.y, ds.test.y])
    assert sorted(collections.Counter(y.tolist())) == [0, 1, 2] and ds.num_classes == 3
    ids = ds.train.x[0, 0]
    assert (ids == 102).sum() == 2  # [CLS] a [SEP] b [SEP]: two separators (MiniLM's [SEP] is 102)


def test_separate_test_file(tmp_path, cache):
    train = write_csv(tmp_path / "train.csv", reviews(30))
    test = write_csv(tmp_path / "test.csv", reviews(8))
    ds = data.load("csv", path=train, test_path=test, max_length=16, cache_dir=cache)
    assert len(ds.test) == 8 and len(ds.train) + len(ds.val) == 30


def test_lm_target(tmp_path, cache):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["hello world", "", "a b c d", "x"] * 5))
    ds = data.load("jsonl", path=str(jl), target="lm", max_length=8, cache_dir=cache, val_fraction=0.0)
    assert len(ds.train) + len(ds.test) == 15  # the 5 empty texts are dropped
    assert "5 empty texts dropped" in ds.source
    x, y = ds.train.x, ds.train.y
    assert y.shape == (len(x), 7)
    real = x[:, 1, 1:].bool()
    assert torch.equal(y[real], x[:, 0, 1:][real]) and torch.all(y[~real] == -100)


def test_empty_texts_are_kept_for_classification(tmp_path, cache):
    rows = reviews(20)
    rows[3]["text"] = ""
    ds = data.load("csv", path=write_csv(tmp_path / "e.csv", rows), max_length=16, cache_dir=cache)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20
    assert "1 empty texts kept" in ds.source


def test_bad_input_names_the_problem(tmp_path, cache):
    path = write_csv(tmp_path / "r.csv", reviews())
    with pytest.raises(ValueError, match=r"no column 'review' \(data.text\); columns found: text, label"):
        data.load("csv", path=path, text="review", cache_dir=cache)
    with pytest.raises(ValueError, match=r"no column 'stars' \(data.label\); columns found: text, label"):
        data.load("csv", path=path, label="stars", cache_dir=cache)
    with pytest.raises(ValueError, match=r"label values outside data.labels \['pos'\]: 'neg' \(20x\)"):
        data.load("csv", path=path, labels=["pos"], cache_dir=cache)
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        data.load("csv", path=str(tmp_path / "missing.csv"), cache_dir=cache)
    with pytest.raises(ValueError, match="data.path is required"):
        data.load("jsonl", cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        data.load("jsonl", path=str(bad), cache_dir=cache)
    with pytest.raises(ValueError, match="data.target must be"):
        data.load("csv", path=path, target="regression", cache_dir=cache)
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\nb,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid utf-8.*data.encoding"):
        data.load("csv", path=str(tmp_path / "latin.csv"), cache_dir=cache)
    with pytest.raises(ValueError, match="does not exist"):
        data.load("csv", path=path, tokenizer=str(tmp_path / "no-model"), cache_dir=cache)


def test_cache_file_is_reused(tmp_path):
    path = write_csv(tmp_path / "r.csv", reviews())
    d = tmp_path / "cache"
    a = data.load("csv", path=path, max_length=16, cache_dir=str(d))
    (f,) = d.glob("*.pt")
    stamp = f.stat().st_mtime_ns
    b = data.load("csv", path=path, max_length=16, cache_dir=str(d))
    assert f.stat().st_mtime_ns == stamp and torch.equal(a.train.x, b.train.x)
    data.load("csv", path=path, max_length=16, cache=False, cache_dir=str(tmp_path / "off"))
    assert not (tmp_path / "off").exists()


def test_easyvqa_loader(cache):
    pytest.importorskip("easy_vqa")
    ds = data.load("easyvqa", cache_dir=cache)
    assert ds.num_classes == 13 and ds.input_shape == (3, 64, 64)
    assert len(ds.train) + len(ds.val) == 38575 and len(ds.test) == 9673
    train_imgs = set(ds.train.x[:, 2, 0].tolist())
    val_imgs = set(ds.val.x[:, 2, 0].tolist())
    assert not train_imgs & val_imgs and len(val_imgs) == 400  # whole images held out
    x, y = next(iter(data.batches(ds.train, 8, generator=torch.Generator().manual_seed(0))))
    assert x.image.shape == (8, 3, 64, 64) and x.image.dtype == torch.float32
    assert x.tokens.shape[:2] == (8, 2) and y.shape == (8,)
    small = data.load("easyvqa", cache_dir=cache, num_train=100)
    assert len(small.train) == 100


def test_csv_and_jsonl_share_one_options_dataclass_and_the_config_checks_its_types():
    import dataclasses
    import inspect

    from bpfree import config as C
    from bpfree.data import text

    fields = [f.name for f in dataclasses.fields(text.FileOptions)]
    for loader in (text.csv_file, text.jsonl_file):
        params = inspect.signature(loader).parameters
        assert list(params)[4:] == fields and params["max_length"].default == 128
    assert data.option_names("jsonl") == fields
    with pytest.raises(ValueError, match="unknown option.*'max_len'.*max_length"):
        text.csv_file(None, False, path="x.csv", max_len=3)
    with pytest.raises(C.ConfigError, match="data.max_length of 'csv' must be"):
        C.resolve(C.from_dict({"data": {"name": "csv", "path": "x.csv", "max_length": "long"},
                               "model": {"name": "minilm"}, "estimator": {"name": "mezo"}}))
