"""The pass plan of a block (which outputs are recorded, replayed, shortcut) and the engine's context stack."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from common.engine.model import ContextStack
from common.engine.plan import Pass, plan_passes, weights_read

LLAMA_GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
LLAMA_TAILS = {"attn": "o", "mlp": "down"}
LLAMA_INSIDE = {"attn": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"]}


def test_llama_block_runs_attention_and_the_mlp_hidden_layer_once():
    passes = plan_passes(LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE)
    assert passes == [
        Pass(("q", "k", "v")),
        # q, k, v are not recorded: attention is computed from o's kept input from the next pass on
        Pass(("o",), keep_inputs=("o",)),
        Pass(("gate", "up"), record=("o",), from_tail_linear=("attn",)),
        Pass(("down",), replay=("o",), from_tail_linear=("attn",), keep_inputs=("down",), drop_inputs=("o",)),
        Pass((), replay=("o",), from_tail_linear=("attn", "mlp")),
    ]
    assert [step.final for step in passes] == [False] * 4 + [True]


def test_without_tails_each_solved_linear_is_recorded_once_and_replayed_after():
    passes = plan_passes([["a"], ["b"], ["c"]], {}, {})
    assert passes == [
        Pass(("a",)),
        Pass(("b",), record=("a",)),
        Pass(("c",), replay=("a",)),  # the last group's pass records nothing: b would serve the final pass alone
        Pass((), replay=("a",)),
    ]


def test_without_reuse_every_pass_computes_everything():
    passes = plan_passes(LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE, reuse_outputs=False)
    assert passes == [Pass(tuple(group)) for group in LLAMA_GROUPS] + [Pass(())]


def test_a_tail_submodule_reads_only_what_an_earlier_pass_kept_or_recorded():
    for groups in (LLAMA_GROUPS, [["q", "k", "v", "o"], ["gate", "up", "down"]], [["q"], ["k", "v"], ["o", "gate"],
                                                                                 ["up"], ["down"]]):
        kept, recorded = set(), set()
        for step in plan_passes(groups, LLAMA_TAILS, LLAMA_INSIDE):
            kept -= set(step.drop_inputs)
            assert set(step.replay) <= recorded
            for module in step.from_tail_linear:
                assert LLAMA_TAILS[module] in kept | recorded
            recorded |= set(step.record)
            kept |= set(step.keep_inputs)


def test_each_pass_reads_the_weights_it_computes():
    passes = plan_passes(LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE)
    read = [set(weights_read(step, LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE)) for step in passes]
    assert read == [
        {"q", "k", "v"},  # a group of three: which the forward reaches before it stops is the model's
        {"q", "k", "v"},  # attention runs up to o's input
        {"o", "gate", "up"},  # attention is o applied to its kept input
        {"gate", "up"},  # o replayed; the MLP runs up to down's input
        {"down"},  # both tails from their tail linears, o's output replayed
    ]
    everything = weights_read(Pass(()), LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE)
    assert everything == {name for group in LLAMA_GROUPS for name in group}
    without_reuse = plan_passes(LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE, reuse_outputs=False)
    assert weights_read(without_reuse[3], LLAMA_GROUPS, LLAMA_TAILS, LLAMA_INSIDE) == {"q", "k", "v", "o", "gate",
                                                                                        "up"}


def test_context_stack_exits_from_the_top_and_the_rest_on_an_error():
    events = []

    @contextmanager
    def tracked(name):
        events.append(f"enter {name}")
        try:
            yield
        finally:
            events.append(f"exit {name}")

    with pytest.raises(RuntimeError), ContextStack() as stack:
        for name in ("c", "b", "a"):
            stack.push(tracked(name))
        stack.pop()
        raise RuntimeError("planted")
    assert events == ["enter c", "enter b", "enter a", "exit a", "exit b", "exit c"]
