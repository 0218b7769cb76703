import sys
import types

import pytest
import torch

from prunerzero.models import corpora
from prunerzero.models.corpora import (
    CorpusError,
    CorpusTooShortError,
    TokenizedCorpus,
    calibration_windows,
    eval_windows,
    fetch_corpus,
    load_text,
    load_tokenized,
    split_by_position,
)


class CharTokenizer:
    """A tiny character-level tokenizer with the slice of the HF interface corpora uses."""

    def __init__(self, alphabet="abcdefghijklmnopqrstuvwxyz .\n"):
        self.vocab = {c: i for i, c in enumerate(alphabet)}
        self.calls = 0

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        bos = [] if not add_special_tokens else [len(self.vocab)]
        return {"input_ids": bos + [self.vocab[c] for c in text if c in self.vocab]}

    def get_vocab(self):
        return dict(self.vocab)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "my novel.txt"
    path.write_text("it is a truth universally acknowledged.\n" * 50)
    return path


def stream(n, offset=5000):
    return torch.arange(offset, offset + n)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize(
    "fractions, sizes", [((0.8, 0.1, 0.1), (800, 100, 100)), ((0.5, 0.3, 0.2), (500, 300, 200))]
)
def test_splits_are_consecutive_positions_sized_by_fractions(fractions, sizes):
    ids = stream(1000)
    splits = split_by_position(ids, fractions)
    assert list(splits) == ["train", "valid", "test"]
    assert tuple(len(s) for s in splits.values()) == sizes
    # Consecutive slices that cover the stream once: disjoint, in order, nothing left out.
    assert torch.equal(torch.cat(list(splits.values())), ids)


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_position(stream(10), (0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="three"):
        split_by_position(stream(10), (0.9, 0.1))


# ---------------------------------------------------------------- windows


def test_calibration_windows_are_seeded_contiguous_and_inside_train():
    train = stream(300)
    a = calibration_windows(train, n=16, seq_len=20, seed=0)
    assert a.shape == (16, 20) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(train, n=16, seq_len=20, seed=0))
    assert not torch.equal(a, calibration_windows(train, n=16, seq_len=20, seed=1))
    # Each row is a contiguous run of the stream, and one target token follows it inside train.
    assert torch.equal(a - a[:, :1], torch.arange(20).expand(16, 20))
    assert a.min() >= train[0] and a.max() <= train[-2]


def test_calibration_can_use_every_start_of_a_minimal_split():
    train = stream(21)  # seq_len + 1: the only start is 0
    windows = calibration_windows(train, n=3, seq_len=20, seed=0)
    assert torch.equal(windows, train[:20].expand(3, 20))


def test_eval_windows_are_consecutive_non_overlapping_and_capped():
    split = stream(105)
    all_windows = eval_windows(split, seq_len=10)
    assert all_windows.shape == (10, 10)
    assert torch.equal(all_windows.flatten(), split[:100])
    capped = eval_windows(split, seq_len=10, max_windows=3)
    assert torch.equal(capped, all_windows[:3])
    assert eval_windows(split, seq_len=10, max_windows=50).shape == (10, 10)


def test_too_short_splits_name_corpus_split_and_counts():
    corpus = TokenizedCorpus("tiny", stream(100), split_by_position(stream(100)))
    with pytest.raises(CorpusTooShortError, match=r"'tiny'.*'train' has 80 tokens.*at least 81"):
        corpus.calibration(n=4, seq_len=80, seed=0)
    with pytest.raises(CorpusTooShortError, match=r"'tiny'.*'test' has 10 tokens.*at least 16"):
        corpus.evaluation("test", seq_len=16)
    assert corpus.evaluation("test", seq_len=10).shape == (1, 10)
    assert issubclass(CorpusTooShortError, CorpusError)


def test_bad_window_arguments_are_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(stream(10), seq_len=0)
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(stream(10), seq_len=2, max_windows=0)
    with pytest.raises(ValueError, match="n must"):
        calibration_windows(stream(10), n=0, seq_len=2, seed=0)
    corpus = TokenizedCorpus("tiny", stream(10), split_by_position(stream(10)))
    with pytest.raises(CorpusError, match="unknown split 'validation'"):
        corpus.evaluation("validation", seq_len=1)


# ---------------------------------------------------------------- texts


def test_unknown_corpus_and_missing_file_are_errors(cache):
    with pytest.raises(CorpusError, match="unknown corpus 'pile': use austen, mobydick, wikitext2, c4 or a path"):
        load_text("pile")
    with pytest.raises(CorpusError, match="not found: nowhere/book.txt"):
        load_text("nowhere/book.txt")
    with pytest.raises(CorpusError, match="cannot fetch 'pile'"):
        fetch_corpus("pile")


def test_local_text_file(cache, text_file):
    corpus = load_text(str(text_file))
    assert corpus.text == text_file.read_text()
    assert corpus.name == "my_novel"  # file-name safe
    assert corpus.source == str(text_file.resolve())
    tokenizer = CharTokenizer()
    tokenized = load_tokenized(str(text_file), tokenizer)
    # No special tokens: the stream is exactly the text's characters.
    assert tokenized.ids.tolist() == tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert len(tokenized.ids) == len(text_file.read_text())


def test_token_cache_is_reused_and_invalidated(cache, text_file):
    tokenizer = CharTokenizer()
    first = load_tokenized(str(text_file), tokenizer)
    second = load_tokenized(str(text_file), tokenizer)
    assert tokenizer.calls == 1
    assert torch.equal(first.ids, second.ids)
    assert [p.name[:9] for p in (cache / "tokens").iterdir()] == ["my_novel-"]

    text_file.write_text("a changed text.\n" * 40)
    changed = load_tokenized(str(text_file), tokenizer)
    assert tokenizer.calls == 2
    assert len(changed.ids) == len("a changed text.\n") * 40

    # A tokenizer with another vocabulary never reuses the ids.
    other = CharTokenizer(alphabet=".\n abcdefghijklmnopqrstuvwxyz")
    assert not torch.equal(load_tokenized(str(text_file), other).ids, changed.ids)
    assert other.calls == 1
    files = sorted(p.name for p in (cache / "tokens").iterdir())
    assert len(files) == 3 and not any(name.endswith(".tmp") for name in files)


def test_named_corpus_is_read_from_the_text_cache(cache, monkeypatch):
    monkeypatch.setitem(corpora.FETCHERS, "wikitext2", lambda: pytest.fail("fetched although cached"))
    (cache / "corpora").mkdir(parents=True)
    (cache / "corpora" / "wikitext2.txt").write_text("cached wiki text")
    corpus = load_text("wikitext2")
    assert (corpus.name, corpus.text) == ("wikitext2", "cached wiki text")


def test_hub_corpora_without_datasets_say_so(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(CorpusError, match=r"'wikitext2' needs the optional package `datasets`.*'austen'"):
        load_text("wikitext2")
    assert not (cache / "corpora" / "wikitext2.txt").exists()


def test_hub_corpora_offline_say_so(cache, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CorpusError, match=r"'c4': could not load allenai/c4 from the Hugging Face hub.*'austen'"):
        load_text("c4")


def test_austen_without_apt_says_so(cache, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(CorpusError, match="needs `apt-get`"):
        load_text("austen")


@pytest.mark.real
def test_real_austen_has_six_novels_in_publication_order():
    text = load_text("austen").text  # from the cache, or fetched through apt
    titles = [
        "SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY", "Persuasion"
    ]
    # Each book opens with its title on a line of its own.
    positions = [f"\n{text}".find(f"\n{title}\n") for title in titles]
    assert -1 not in positions and positions == sorted(positions)
    assert len(text) > 3.5e6


def test_mobydick_is_read_from_the_r_data_set_without_gutenbergs_header_and_licence(monkeypatch, tmp_path):
    import numpy as np

    from prunerzero.models import corpora

    book = ("The Project Gutenberg EBook of Moby Dick\nlicence...\n*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\n"
            "Call me Ishmael.\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nmore licence")
    monkeypatch.setattr(corpora, "r_objects", lambda data_dir, names: {"mobydick": np.array([book])})
    assert corpora.mobydick_text_from_rdata(tmp_path) == "Call me Ishmael.\n"
    assert "mobydick" in corpora.FETCHERS
