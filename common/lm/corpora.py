"""Calibration and evaluation text for LLM quantization, and the token windows cut from it.

Corpora are looked up by name in :data:`CORPORA`; every corpus has a ``"train"`` split (calibration) and a
``"test"`` split (perplexity evaluation), returned as one string by :func:`load_corpus`.

Embedded corpora (offline, shipped inside the installed ``gensim`` wheel's test data):

* ``"wiki_embedded"`` (the default, :data:`DEFAULT_CORPUS`): real English Wikipedia, a shortened 2016 dump of
  206 pages in MediaWiki XML. Redirects, non-article namespaces, disambiguation pages and stubs (fewer than
  :data:`MIN_ARTICLE_CHARS` characters of prose after cleaning) are dropped; the markup is stripped in the
  spirit of WikiText (templates, references, tables, files, categories and trailing reference sections go;
  links keep their visible label; headings are kept as `` = Title = `` / `` = = Section = = ``; see
  :mod:`common.lm.wikitext`). Each article
  is its ``" = Title = "`` line followed by one line per paragraph or list item; articles are joined with
  ``"\\n\\n"``.
* ``"news_embedded"``: ``lee_background.cor``, 300 Australian news articles (one per line), a C4-like second
  domain; documents are joined with ``"\\n\\n"``.

Both are split per document with :func:`is_test_document`: a document goes to ``"test"`` when the first 8
bytes of the SHA-256 of its key (article title / document text), read as a big-endian integer, are ``< 20``
modulo 100; about 80 % of the documents are train and 20 % test, no document is in both, and the split does
not depend on the order or number of the other documents.

Hub corpora (the paper's settings, through ``datasets.load_dataset``; any failure, e.g. no network, raises
:class:`CorpusUnavailableError`):

* ``"wikitext2"``: ``Salesforce/wikitext`` (formerly ``wikitext``), config ``wikitext-2-raw-v1``; the rows
  of the train / test split joined with ``"\\n\\n"`` (as in the QuaRot / GPTAQ code; GPTQ's original joins
  the train rows with ``" "``).
* ``"c4"``: ``allenai/c4``, English shard files. ``"test"`` is GPTQ's evaluation text: the first
  :data:`C4_EVAL_DOCUMENTS` documents of ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "``
  (GPTQ then keeps the first 256 windows: ``evaluation_windows(..., max_windows=256)``). ``"train"`` is
  :data:`C4_TRAIN_DOCUMENTS` documents taken at an even stride through ``en/c4-train.00000-of-01024.json.gz``
  joined with ``"\\n\\n"``; unlike GPTQ, which draws each window inside one random long document, windows
  are drawn from this concatenation and may cross a document boundary.
* ``"ptb"``: ``ptb-text-only/ptb_text_only`` (formerly ``ptb_text_only``), config ``penn_treebank``, field
  ``"sentence"``, the train / test split joined with ``" "`` (GPTQ's ``ptb-new`` protocol). ``datasets`` 4+
  refuses datasets that still need a loading script; that also surfaces as :class:`CorpusUnavailableError`.

Offline, ``datasets`` retries the Hub for about 25 s before giving up; set ``HF_DATASETS_OFFLINE=1`` to fail
at once (or to read copies already in the local ``datasets`` cache).

Token windows work with any tokenizer called as ``tokenizer(text, return_tensors="pt")`` that returns a
mapping whose ``"input_ids"`` is a LongTensor ``[1, n_tokens]`` (a Hugging Face tokenizer does).
:func:`token_stream` tokenizes a split in pieces of at most :data:`TOKENIZE_CHUNK_CHARS` characters cut at
``"\\n\\n"`` boundaries (bounded work per call; many tokenizers warn on texts above their maximum length);
the special tokens the tokenizer wraps every call in (e.g. a BOS) are kept once at each end of the whole
stream, not at every piece. Splits shorter than the chunk size (all test splits used here) are tokenized in a
single call, exactly as GPTQ does; longer ones may differ from a single call by a token at a piece boundary.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch

from common.lm.wikitext import is_disambiguation, is_heading_line, wikitext_heading, wikitext_to_plain
from common.rules import check_positive

SPLITS = ("train", "test")
"""The split names every corpus provides."""

DEFAULT_CORPUS = "wiki_embedded"
"""The corpus used when none is named: embedded, needs no network."""

MIN_ARTICLE_CHARS = 1500
"""Articles of ``wiki_embedded`` with fewer characters of prose (headings excluded) are stubs and dropped."""

TEST_PERCENT = 20
"""Share of the documents of an embedded corpus that go to the ``"test"`` split, in percent."""

C4_EVAL_DOCUMENTS = 1100
"""Documents of the C4 validation shard concatenated for evaluation (GPTQ's setting)."""

C4_TRAIN_DOCUMENTS = 5000
"""Documents of the C4 train shard kept for calibration (an even stride through the shard)."""

TOKENIZE_CHUNK_CHARS = 2_000_000
"""Largest piece of text (characters) handed to the tokenizer in one call by :func:`tokenize_text`."""

_GENSIM_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_GENSIM_NEWS_FILE = "lee_background.cor"
_SPACES_RE = re.compile(r"[ \t\u00a0]+")


class CorpusUnavailableError(RuntimeError):
    """A hub corpus could not be loaded (no network, dataset moved, ...)."""


class Tokenizer(Protocol):
    """What the window functions need from a tokenizer (a Hugging Face tokenizer qualifies)."""

    def __call__(self, text: str, return_tensors: str = ...) -> Mapping[str, Any]:
        """Tokenize ``text``; ``result["input_ids"]`` is a LongTensor ``[1, n_tokens]``."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Deterministic document split
# ---------------------------------------------------------------------------------------------------------


def is_test_document(key: str) -> bool:
    """Whether the document identified by ``key`` belongs to the ``"test"`` split of an embedded corpus.

    Stable across runs, machines and Python versions (SHA-256, not ``hash()``); about
    :data:`TEST_PERCENT` % of keys are test.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _select_split(documents: Iterable[tuple[str, str]], split: str) -> list[str]:
    """Texts of the ``(key, text)`` documents that fall in ``split``, in their original order."""
    want_test = split == "test"
    return [text for key, text in documents if is_test_document(key) == want_test]


# ---------------------------------------------------------------------------------------------------------
# Embedded corpora
# ---------------------------------------------------------------------------------------------------------


def gensim_test_data_dir() -> Path:
    """Folder of the test data shipped inside the installed ``gensim`` package (found without importing it)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(
            "the embedded corpora need the 'gensim' package (its wheel ships the text): pip install gensim"
        )
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def _iter_wiki_pages(path: Path) -> Iterator[tuple[str, int, bool, str]]:
    """``(title, namespace, is_redirect, markup)`` of every page of a bz2-compressed MediaWiki XML dump."""
    with bz2.open(path, "rb") as stream:
        for _event, element in ET.iterparse(stream, events=("end",)):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element}
            revision = fields.get("revision")
            text_element = None if revision is None else revision.find("{*}text")
            markup = "" if text_element is None else text_element.text or ""
            is_redirect = "redirect" in fields or markup.lstrip().upper().startswith("#REDIRECT")
            title = fields["title"].text or ""
            yield title, int(fields["ns"].text or 0), is_redirect, markup
            element.clear()


def _is_article(title: str, namespace: int, is_redirect: bool, markup: str) -> bool:
    """Main-namespace content page: not a redirect, not a disambiguation page."""
    if namespace != 0 or is_redirect:
        return False
    return not (title.endswith("(disambiguation)") or is_disambiguation(markup))


def _prose_chars(plain: str) -> int:
    """Characters of an article's cleaned text outside its headings."""
    return sum(len(line) for line in plain.split("\n") if not is_heading_line(line))


@cache
def embedded_wiki_articles() -> tuple[tuple[str, str], ...]:
    """``(title, text)`` of the kept articles of the embedded Wikipedia dump, in dump order (cached).

    ``text`` starts with the WikiText-style title line ``" = Title = "``, then one line per heading,
    paragraph or list item.
    """
    articles = []
    for title, namespace, is_redirect, markup in _iter_wiki_pages(gensim_test_data_dir() / _GENSIM_WIKI_FILE):
        if not _is_article(title, namespace, is_redirect, markup):
            continue
        plain = wikitext_to_plain(markup)
        if _prose_chars(plain) >= MIN_ARTICLE_CHARS:
            articles.append((title, f"{wikitext_heading(title, 1)}\n{plain}"))
    return tuple(articles)


def _load_wiki_embedded(split: str) -> str:
    """Embedded Wikipedia articles of ``split``, joined with ``"\\n\\n"``."""
    return "\n\n".join(_select_split(embedded_wiki_articles(), split))


@cache
def _news_documents() -> tuple[str, ...]:
    """The non-empty lines (documents) of gensim's ``lee_background.cor``, whitespace collapsed."""
    raw = (gensim_test_data_dir() / _GENSIM_NEWS_FILE).read_text(encoding="utf-8", errors="replace")
    return tuple(doc for line in raw.splitlines() if (doc := _SPACES_RE.sub(" ", line).strip()))


def _load_news_embedded(split: str) -> str:
    """Embedded news documents of ``split`` (keyed by their text), joined with ``"\\n\\n"``."""
    return "\n\n".join(_select_split(((doc, doc) for doc in _news_documents()), split))


# ---------------------------------------------------------------------------------------------------------
# Hub corpora
# ---------------------------------------------------------------------------------------------------------


def _hub_dataset(corpus: str, path: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(path, **kwargs)``; any failure becomes a :class:`CorpusUnavailableError`."""
    try:
        import datasets

        return datasets.load_dataset(path, **kwargs)
    except Exception as exc:  # network, hub, cache and format errors all mean "not available here"
        raise CorpusUnavailableError(
            f"cannot load corpus {corpus!r} (Hugging Face dataset {path!r}): {type(exc).__name__}: {exc}. "
            f"Without access to the Hugging Face Hub use the embedded corpus {DEFAULT_CORPUS!r}."
        ) from exc


def _load_wikitext2(split: str) -> str:
    """WikiText-2 (raw) rows of ``split`` joined with ``"\\n\\n"``, as in GPTQ's reference code."""
    data = _hub_dataset("wikitext2", "Salesforce/wikitext", name="wikitext-2-raw-v1", split=split)
    return "\n\n".join(data["text"])


def _load_c4(split: str) -> str:
    """C4 (en): GPTQ's validation text for ``"test"``, a strided sample of one train shard for ``"train"``."""
    if split == "test":
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        data = _hub_dataset("c4", "allenai/c4", data_files=files, split="validation")
        return " ".join(data.select(range(min(C4_EVAL_DOCUMENTS, len(data))))["text"])
    files = {"train": "en/c4-train.00000-of-01024.json.gz"}
    data = _hub_dataset("c4", "allenai/c4", data_files=files, split="train")
    stride = max(1, len(data) // C4_TRAIN_DOCUMENTS)
    return "\n\n".join(data.select(range(0, len(data), stride)[:C4_TRAIN_DOCUMENTS])["text"])


def _load_ptb(split: str) -> str:
    """Penn Treebank (text only) sentences of ``split`` joined with ``" "``."""
    data = _hub_dataset("ptb", "ptb-text-only/ptb_text_only", name="penn_treebank", split=split)
    return " ".join(data["sentence"])


CorpusLoader = Callable[[str], str]
"""``loader(split) -> text``: the whole split as one string (split already validated)."""

CORPORA: dict[str, CorpusLoader] = {
    "wiki_embedded": _load_wiki_embedded,
    "news_embedded": _load_news_embedded,
    "wikitext2": _load_wikitext2,
    "c4": _load_c4,
    "ptb": _load_ptb,
}
"""Registry of corpus names -> loaders. The ``*_embedded`` corpora work offline; the others need the Hub."""


def load_corpus(name: str, split: str) -> str:
    """The text of split ``split`` (``"train"`` or ``"test"``) of corpus ``name`` (a key of :data:`CORPORA`).

    Raises ``ValueError`` for an unknown name or split, :class:`CorpusUnavailableError` when a hub corpus
    cannot be fetched.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; allowed names: {', '.join(sorted(CORPORA))}")
    _check_split(split)
    return CORPORA[name](split)


def text_fingerprint(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_fingerprint(name: str, split: str) -> str:
    """Hex SHA-256 of :func:`load_corpus(name, split) <load_corpus>`'s text, to record in results files."""
    return text_fingerprint(load_corpus(name, split))


# ---------------------------------------------------------------------------------------------------------
# Tokenization and windows
# ---------------------------------------------------------------------------------------------------------


def _text_pieces(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` after ``"\\n\\n"`` separators into pieces of at most ``max_chars`` characters.

    The pieces concatenate back to ``text``; a paragraph longer than ``max_chars`` stays whole.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n\n", start, start + max_chars)
        if cut < 0:
            cut = text.find("\n\n", start + max_chars)
            if cut < 0:
                break
        pieces.append(text[start : cut + 2])
        start = cut + 2
    pieces.append(text[start:])
    return pieces


def _encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text``: LongTensor ``[n_tokens]``."""
    return torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1).long()


def _added_special_tokens(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix and suffix ids the tokenizer adds around every call (e.g. BOS / EOS), each ``[k]``.

    Found by encoding ``""`` (prefix + suffix) and ``"a"``: the prefix is their common head.
    """
    empty, probe = _encode(tokenizer, ""), _encode(tokenizer, "a")
    head = 0
    while head < min(len(empty), len(probe)) and empty[head] == probe[head]:
        head += 1
    return empty[:head], empty[head:]


def tokenize_text(tokenizer: Tokenizer, text: str, *, chunk_chars: int = TOKENIZE_CHUNK_CHARS) -> torch.Tensor:
    """Token ids of ``text`` as one stream: LongTensor ``[n_tokens]``.

    Texts longer than ``chunk_chars`` characters are tokenized piece by piece (see :func:`_text_pieces`);
    the special tokens the tokenizer adds to every call appear only at the very start and end.
    """
    pieces = _text_pieces(text, chunk_chars)
    if len(pieces) == 1:
        return _encode(tokenizer, text)
    prefix, suffix = _added_special_tokens(tokenizer)
    parts = []
    for index, piece in enumerate(pieces):
        ids = _encode(tokenizer, piece)
        if index > 0 and len(prefix) and torch.equal(ids[: len(prefix)], prefix):
            ids = ids[len(prefix) :]
        if index < len(pieces) - 1 and len(suffix) and torch.equal(ids[len(ids) - len(suffix) :], suffix):
            ids = ids[: len(ids) - len(suffix)]
        parts.append(ids)
    return torch.cat(parts)


_TOKEN_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], torch.Tensor]] = weakref.WeakKeyDictionary()


def token_stream(tokenizer: Tokenizer, corpus: str, split: str) -> torch.Tensor:
    """The whole split tokenized as one stream: LongTensor ``[n_tokens]`` (do not modify in place).

    Cached in memory per tokenizer object (weakly, freed with the tokenizer) and per
    ``(corpus, split, text fingerprint)``, so a changed corpus is never served stale tokens.
    """
    text = load_corpus(corpus, split)
    key = (corpus, split, text_fingerprint(text))
    try:
        per_tokenizer = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: no caching
        return tokenize_text(tokenizer, text)
    if key not in per_tokenizer:
        per_tokenizer[key] = tokenize_text(tokenizer, text)
    return per_tokenizer[key]


def calibration_windows(tokenizer: Tokenizer, corpus: str, *, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the ``"train"`` split: LongTensor ``[nsamples, seqlen]``.

    GPTQ-style: window starts are drawn uniformly in ``[0, n_tokens - seqlen]`` by a ``torch.Generator``
    seeded with ``seed`` (same seed, corpus and tokenizer -> same windows); windows may overlap. Raises
    ``ValueError`` (naming ``seqlen`` or ``nsamples``) when the split has fewer than ``seqlen`` tokens or
    fewer than ``nsamples * seqlen`` tokens (the windows would mostly repeat the same text).
    """
    check_positive("nsamples", nsamples)
    check_positive("seqlen", seqlen)
    ids = token_stream(tokenizer, corpus, "train")
    n_tokens = ids.numel()
    if n_tokens < seqlen:
        raise ValueError(f"seqlen={seqlen} is longer than the train split of {corpus!r} ({n_tokens} tokens)")
    if n_tokens < nsamples * seqlen:
        raise ValueError(
            f"nsamples={nsamples} windows of seqlen={seqlen} need {nsamples * seqlen} tokens, but the train "
            f"split of {corpus!r} has only {n_tokens}; lower nsamples or use a larger corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seqlen)]


def evaluation_windows(
    tokenizer: Tokenizer, corpus: str, *, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows of the ``"test"`` split: LongTensor ``[n_windows, seqlen]``.

    GPTQ / QuaRot perplexity protocol: window ``i`` holds tokens ``[i * seqlen, (i + 1) * seqlen)``;
    the incomplete tail is dropped. ``max_windows`` keeps only the first ``max_windows`` windows (quick runs;
    ``max_windows=256`` on ``"c4"`` reproduces GPTQ's C4 evaluation). Raises ``ValueError`` naming
    ``seqlen`` when the split is shorter than one window.
    """
    check_positive("seqlen", seqlen)
    if max_windows is not None:
        check_positive("max_windows", max_windows)
    ids = token_stream(tokenizer, corpus, "test")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"seqlen={seqlen} is longer than the test split of {corpus!r} ({ids.numel()} tokens)")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return ids[: n_windows * seqlen].reshape(n_windows, seqlen).clone()
