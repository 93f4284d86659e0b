"""A fake_quant run in a process of its own, that kills itself when told (for the resume tests).

``python -m fake_quant.tests.blockwise_worker [--tiny-data] [--kill-after-block K | --kill-writing-block K] ARGS``
runs ``fake_quant.main`` with ``ARGS``. ``--tiny-data`` registers the tiny corpus and the byte tokenizer (for
a model folder without a tokenizer, given by ``--model``). ``--kill-after-block K`` sends SIGKILL to itself
once the first quantizing method's state after block ``K`` is kept; ``--kill-writing-block K`` once the
streams file for the block after ``K`` is written but not yet renamed (a checkpoint killed during its write).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import common.engine.resume as resume
import common.lm.corpora as corpora
from common.llama import experiment
from common.tests.llama_fixtures import SENTENCES, TINY_CORPUS, CharTokenizer
from fake_quant import main as fq_main


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_tiny_data() -> None:
    texts = {"train": " ".join(SENTENCES * 40), "test": " ".join(reversed(SENTENCES * 10))}
    corpora.CORPORA[TINY_CORPUS] = lambda split: texts[split]
    tokenizer = CharTokenizer()
    experiment.load_llama_tokenizer = lambda model: tokenizer


def _kill_after(block: int) -> None:
    save = resume.CalibrationCheckpoint.save

    def save_then_die(self, state):
        save(self, state)
        if state.next_block == block + 1:
            _kill()

    resume.CalibrationCheckpoint.save = save_then_die


def _kill_writing(block: int) -> None:
    write = resume.atomic_write

    def write_then_die(path, writer):
        if Path(path).name.startswith(f"streams-{block + 1:05d}."):
            writer(str(Path(path).parent / f".{Path(path).name}.{os.getpid()}.partial.tmp"))
            _kill()
        return write(path, writer)

    resume.atomic_write = write_then_die


def main(argv: list[str]) -> int:
    rest = list(argv)
    if rest and rest[0] == "--tiny-data":
        _install_tiny_data()
        rest = rest[1:]
    if rest and rest[0] == "--kill-after-block":
        _kill_after(int(rest[1]))
        rest = rest[2:]
    elif rest and rest[0] == "--kill-writing-block":
        _kill_writing(int(rest[1]))
        rest = rest[2:]
    return fq_main.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
