"""Offline zero-shot tasks for lm-eval, built from the test documents of the embedded corpora.

Two tasks, named in :data:`EMBEDDED_TASKS`, each of :data:`EXAMPLES` examples drawn with :data:`SEED` from
the ``"test"`` split of ``wiki_embedded`` and ``news_embedded`` (see :mod:`common.lm.corpora`; calibration
reads only ``"train"``, so no example was seen during calibration):

* ``last_word_embedded`` (LAMBADA-style last-word prediction, lm-eval ``loglikelihood``, metric ``acc``:
  the model's greedy continuation equals the word): up to :data:`CONTEXT_SENTENCES` sentences of a document
  followed by its next sentence without the last word; the target is that word (trailing punctuation
  dropped), a word of at least :data:`MIN_TARGET_LETTERS` letters. LAMBADA keeps only words that people can
  guess from the passage but not from the last sentence alone; the nearest check a corpus allows, "the word
  occurs in the passage", leaves about 630 examples in this text, too few for a 1.6-point standard error, so
  it is recorded per example (``in_context``, true for about one in six) instead of enforced. The task is
  therefore harder than LAMBADA: closer to predicting a sentence's last content word.
* ``cloze_embedded`` (4-way multiple choice, metrics ``acc`` and ``acc_norm``, lm-eval's normalisation
  by the choice's length in characters): the first half of a sentence of at least :data:`MIN_CLOZE_WORDS`
  words; the choices are its true second half and the second halves of three other sentences of the same
  document (same topic, so the choice rests on the stem, not on the subject) whose word counts differ from
  the true one's by at most :data:`LENGTH_SLACK_WORDS` (so length gives the answer away to neither metric);
  sentences whose document has too few such endings are skipped; the true one's position is drawn at random.

Sentences are the lines of a document (headings dropped) cut after ``.``, ``!`` or ``?`` before a capital,
quote or parenthesis. :func:`embedded_task_folder` writes ``<cache>/zeroshot/<key>/``: one JSONL of examples
and one lm-eval task YAML per task, and ``manifest.json`` (per task: SHA-256 of its JSONL, example count,
sources), written as a set with the manifest last. ``key`` hashes :data:`GENERATOR_VERSION`, the seed, the
counts and the SHA-256 of each source text, so a change of text or generator gets a new folder; a folder
whose files do not match its manifest (missing, truncated, edited) is rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from common.cache import cache_root
from common.files import atomic_write_set, json_text, write_text
from common.lm.corpora import corpus_fingerprint, load_corpus

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bump when the generation below changes: it is part of the cache key and of the recorded identity."""

SEED = 0
"""Seed of the example draws (``random.Random``), fixed so every run scores the same examples."""

EXAMPLES = 1000
"""Examples per task: lm-eval's standard error of an accuracy near 50 % is then about 1.6 points."""

SOURCES: tuple[str, ...] = ("wiki_embedded", "news_embedded")
"""The corpora whose ``"test"`` documents the tasks are drawn from."""

CONTEXT_SENTENCES = 3
"""Most sentences of the document kept before the target sentence of ``last_word_embedded``."""

MIN_TARGET_LETTERS = 4
"""Shortest target word of ``last_word_embedded`` (letters only)."""

MIN_CLOZE_WORDS = 10
"""Shortest sentence whose halves make a ``cloze_embedded`` example."""

LENGTH_SLACK_WORDS = 2
"""Largest difference in words between a distractor ending and the true one."""

CHOICES = 4
"""Choices per ``cloze_embedded`` example."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_TARGET_WORD = re.compile(rf"[A-Za-z]{{{MIN_TARGET_LETTERS},}}")
_TRAILING_PUNCTUATION = ".!?,;:\"')"


@dataclass(frozen=True)
class Paragraph:
    """The sentences of one line of a test document; ``document`` identifies the document within ``corpus``."""

    corpus: str
    document: int
    sentences: tuple[str, ...]


def _split_sentences(line: str) -> tuple[str, ...]:
    return tuple(s for s in (part.strip() for part in _SENTENCE_END.split(line.strip())) if s)


def evaluation_paragraphs(corpus: str) -> list[Paragraph]:
    """The paragraphs of the ``"test"`` split of ``corpus`` in corpus order (documents are separated by a
    blank line; heading lines, `` = Title = ``, are dropped)."""
    paragraphs = []
    for index, document in enumerate(load_corpus(corpus, "test").split("\n\n")):
        for line in document.split("\n"):
            if line.strip() and not line.strip().startswith("="):
                paragraphs.append(Paragraph(corpus, index, _split_sentences(line)))
    return paragraphs


def _last_word_candidates(paragraphs: Sequence[Paragraph]) -> Iterator[dict[str, Any]]:
    documents: dict[tuple[str, int], list[str]] = {}
    for paragraph in paragraphs:
        documents.setdefault((paragraph.corpus, paragraph.document), []).extend(paragraph.sentences)
    for (corpus, document), sentences in documents.items():
        for position in range(1, len(sentences)):
            words = sentences[position].split()
            target = words[-1].rstrip(_TRAILING_PUNCTUATION)
            if len(words) < 2 or not _TARGET_WORD.fullmatch(target):
                continue
            before = sentences[max(0, position - CONTEXT_SENTENCES):position]
            seen = {w.strip(_TRAILING_PUNCTUATION + "(").lower() for s in before for w in s.split()}
            yield {"context": " ".join([*before, *words[:-1]]), "target": target, "in_context": target.lower() in seen,
                   "corpus": corpus, "document": document}


def build_last_word(paragraphs: Sequence[Paragraph], rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``count`` examples (all candidates if fewer) ``{"context", "target", "in_context", "corpus",
    "document"}``, drawn without replacement, in corpus order."""
    candidates = list(_last_word_candidates(paragraphs))
    chosen = sorted(rng.sample(range(len(candidates)), min(count, len(candidates))))
    return [candidates[i] for i in chosen]


def build_cloze(paragraphs: Sequence[Paragraph], rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``count`` examples (fewer if the text has fewer) ``{"context", "choices", "label", "corpus",
    "document"}`` in corpus order: ``choices[label]`` is the true ending, the others end sentences of the
    same document."""
    sentences = [(p, i) for p in paragraphs for i, s in enumerate(p.sentences) if len(s.split()) >= MIN_CLOZE_WORDS]
    endings: dict[tuple[str, int, int], list[tuple[int, str]]] = {}
    for position, (paragraph, index) in enumerate(sentences):
        words = paragraph.sentences[index].split()
        key = (paragraph.corpus, paragraph.document, len(words) - len(words) // 2)
        endings.setdefault(key, []).append((position, " ".join(words[len(words) // 2:])))
    examples = []
    for choice in rng.sample(range(len(sentences)), len(sentences)):
        if len(examples) == count:
            break
        paragraph, index = sentences[choice]
        words = paragraph.sentences[index].split()
        stem, ending = words[: len(words) // 2], " ".join(words[len(words) // 2:])
        lengths = range(len(words) - len(stem) - LENGTH_SLACK_WORDS, len(words) - len(stem) + LENGTH_SLACK_WORDS + 1)
        same_document = (endings.get((paragraph.corpus, paragraph.document, n), []) for n in lengths)
        pool = sorted({text for found in same_document for position, text in found
                       if position != choice and text != ending})
        if len(pool) < CHOICES - 1:
            continue
        choices = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, ending)
        examples.append({"context": " ".join(stem), "choices": choices, "label": label,
                         "corpus": paragraph.corpus, "document": paragraph.document, "order": choice})
    examples.sort(key=lambda example: example.pop("order"))
    return examples


@dataclass(frozen=True)
class EmbeddedTask:
    """A generated task: its builder and the lm-eval fields that say how to score it."""

    name: str
    description: str
    build: Callable[[Sequence[Paragraph], random.Random, int], list[dict[str, Any]]]
    lm_eval_fields: dict[str, Any]


EMBEDDED_TASKS: dict[str, EmbeddedTask] = {
    task.name: task
    for task in (
        EmbeddedTask(
            "last_word_embedded", "LAMBADA-style last word of a passage, greedy match", build_last_word,
            {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}",
             "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        ),
        EmbeddedTask(
            "cloze_embedded", "true ending of a sentence among 4 (3 from other documents)", build_cloze,
            {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
             "doc_to_target": "label",
             "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                             {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        ),
    )
}
"""The embedded zero-shot tasks by name; every other module takes the names from here."""

MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@cache
def _source_fingerprints() -> dict[str, str]:
    return {corpus: corpus_fingerprint(corpus, "test") for corpus in SOURCES}


def _folder_key() -> str:
    recipe = {"generator": GENERATOR_VERSION, "seed": SEED, "examples": EXAMPLES, "tasks": sorted(EMBEDDED_TASKS),
              "sources": _source_fingerprints()}
    return _sha256(json.dumps(recipe, sort_keys=True).encode())[:16]


def _jsonl(examples: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(example, ensure_ascii=False, sort_keys=True) + "\n" for example in examples)


def _task_yaml(task: EmbeddedTask, data: Path) -> str:
    fields = {"task": task.name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **task.lm_eval_fields, "metadata": {"version": float(GENERATOR_VERSION)}}
    return yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)


def _generate(folder: Path) -> None:
    paragraphs = [p for corpus in SOURCES for p in evaluation_paragraphs(corpus)]
    files: list[tuple[Path, Callable[[str], None]]] = []
    manifest: dict[str, Any] = {"generator": GENERATOR_VERSION, "seed": SEED, "tasks": {}}
    for name, task in EMBEDDED_TASKS.items():
        examples = task.build(paragraphs, random.Random(f"{SEED}:{name}"), EXAMPLES)
        if len(examples) < EXAMPLES:
            logger.warning("%s: the embedded text gives %d examples, fewer than %d", name, len(examples), EXAMPLES)
        body = _jsonl(examples)
        data = folder / f"{name}.jsonl"
        task_yaml = _task_yaml(task, data)
        files += [(data, lambda tmp, text=body: write_text(tmp, text)),
                  (folder / f"{name}.yaml", lambda tmp, text=task_yaml: write_text(tmp, text))]
        sources = {corpus: {"split": "test", "sha256": digest} for corpus, digest in _source_fingerprints().items()}
        manifest["tasks"][name] = {"sha256": _sha256(body.encode("utf-8")), "examples": len(examples),
                                   "description": task.description, "sources": sources}
    files.append((folder / MANIFEST, lambda tmp: write_text(tmp, json_text(manifest))))
    atomic_write_set(files)


def _manifest_if_intact(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest when every task's JSONL matches it and its YAML exists, else ``None``."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        for name in EMBEDDED_TASKS:
            entry = manifest["tasks"][name]
            if _sha256((folder / f"{name}.jsonl").read_bytes()) != entry["sha256"]:
                return None
            if not (folder / f"{name}.yaml").is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def embedded_task_folder(cache_dir: str | Path | None = None) -> Path:
    """The folder of the embedded tasks' YAMLs and data (an lm-eval ``include_path``), generated on first use.

    ``cache_dir`` defaults to :func:`common.cache.cache_root`. A folder that does not match its manifest is
    rebuilt (warning logged).
    """
    folder = cache_root(cache_dir) / "zeroshot" / _folder_key()
    if _manifest_if_intact(folder) is not None:
        return folder
    if folder.exists():
        logger.warning("%s does not match its manifest (a file is missing or changed): rebuilding it", folder)
        shutil.rmtree(folder)
    _generate(folder)
    return folder


def embedded_task_identity(names: Sequence[str], cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What a run's JSON records of the embedded tasks among ``names``: per task its data's SHA-256, example
    count, description, sources (corpus, split, text SHA-256), generator version and seed."""
    wanted = [name for name in names if name in EMBEDDED_TASKS]
    if not wanted:
        return {}
    manifest = _manifest_if_intact(embedded_task_folder(cache_dir))
    assert manifest is not None  # embedded_task_folder just checked or rebuilt it
    return {name: {**manifest["tasks"][name], "generator": manifest["generator"], "seed": manifest["seed"]}
            for name in wanted}
