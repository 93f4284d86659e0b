"""Which outputs the quantized passes over a block record, replay and skip: a pure function of its structure.

A block is calibrated by one quantized-stream pass per group of linears (collecting the group's inputs),
then a final pass that advances the stream. A linear solved in an earlier group gets the same input in every
later pass (its input depends only on weights that are final), so its output can be recorded once and
replayed after. A *tail* submodule (an attention whose output is its ``o_proj``'s, an MLP whose output is
its ``down_proj``'s: :class:`common.engine.adapter.Tail`) need not run at all once its other linears are
solved: its tail linear's input is final, so the submodule is computed as that linear applied to the input
recorded in the tail linear's own pass.

:func:`plan_passes` turns the groups and the tails into one :class:`Pass` per pass. Rules, for the pass of
group ``g`` (``solved`` = the groups before it):

* replay every solved linear recorded in an earlier pass;
* record every other solved linear, except in the last group's pass (what it would record serves the final
  pass alone) and except the linears inside a tail submodule that will be computed from its tail linear from
  the next pass on (nothing would replay them);
* compute from its tail linear every tail submodule whose other linears are solved and whose tail linear's
  input was kept (or output recorded) in an earlier pass;
* keep the inputs of the group's tail linears whose submodule's other linears are solved by now; drop kept
  inputs once the tail linear's output is recorded.

The final pass replays and computes tail submodules by the same rules and records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pass:
    """One quantized-stream pass over a block (names relative to the block).

    Attributes:
        group: the linears whose inputs the pass collects, or ``()`` for the final pass (which runs the whole
            block to advance the stream).
        replay: solved linears whose recorded outputs stand in for computing them.
        record: solved linears whose outputs are recorded (replayed in later passes).
        from_tail_linear: tail submodules computed as their tail linear applied to its kept input (or its
            replayed output), without running the rest of the submodule.
        keep_inputs: tail linears of ``group`` whose inputs, as collected in this pass, are kept for
            ``from_tail_linear``.
        drop_inputs: tail linears whose kept inputs are released before the pass (their outputs are recorded).
    """

    group: tuple[str, ...]
    replay: tuple[str, ...] = ()
    record: tuple[str, ...] = ()
    from_tail_linear: tuple[str, ...] = ()
    keep_inputs: tuple[str, ...] = ()
    drop_inputs: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        """Whether this is the pass that advances the stream."""
        return not self.group


def plan_passes(groups: Sequence[Sequence[str]], tails: Mapping[str, str], inside: Mapping[str, Sequence[str]],
                *, reuse_outputs: bool = True) -> list[Pass]:
    """The passes over a block: one per group, in order, then the final one.

    Args:
        groups: the block's linears grouped by shared input, in true-sequential order.
        tails: ``{tail submodule: its tail linear}``.
        inside: ``{tail submodule: the linears inside it}`` (the tail linear among them).
        reuse_outputs: ``False`` computes every linear in every pass (nothing recorded, replayed or
            computed from a tail linear).
    """
    if not reuse_outputs:
        return [Pass(tuple(group)) for group in groups] + [Pass(())]

    def tail_is_final(linear: str, solved: Sequence[str]) -> bool:
        return any(tail == linear and set(inside[module]) - {linear} <= set(solved) for module, tail in tails.items())

    passes: list[Pass] = []
    solved: list[str] = []
    recorded: set[str] = set()
    kept: list[str] = []
    for position, group in enumerate([*groups, ()]):
        final, last_group = not group, position == len(groups) - 1
        drop = () if final else tuple(name for name in kept if name in recorded)
        kept = [name for name in kept if name not in drop]
        replay = tuple(name for name in solved if name in recorded)
        record: tuple[str, ...] = ()
        if not final and not last_group:
            after = [*solved, *group]
            computed_from_tail = {name for module, tail in tails.items() if tail_is_final(tail, after)
                                  for name in inside[module] if name != tail}
            record = tuple(name for name in solved if name not in recorded and name not in computed_from_tail)
        from_tail = tuple(module for module, tail in tails.items()
                          if tail_is_final(tail, solved) and (tail in recorded or tail in kept))
        keep = tuple(name for name in group if tail_is_final(name, [*solved, *group]))
        passes.append(Pass(tuple(group), replay, record, from_tail, keep, drop))
        recorded.update(record)
        kept.extend(keep)
        solved.extend(group)
    return passes


def weights_read(step: Pass, groups: Sequence[Sequence[str]], tails: Mapping[str, str],
                 inside: Mapping[str, Sequence[str]]) -> frozenset[str]:
    """The linears whose weights ``step`` reads: those of the groups it runs through (every group for the
    final pass; the groups before its own otherwise), less the replayed ones and those inside a submodule
    computed from its tail linear.

    A pass stops at its group's input, so a group of one linear is not computed in its own pass; the
    linears of a larger group count as read (which of them the forward reaches before the stop depends on
    the model's code).
    """
    position = len(groups) if step.final else [tuple(group) for group in groups].index(step.group)
    reached = [name for group in groups[:position] for name in group]
    if len(step.group) > 1:
        reached += step.group
    skipped = set(step.replay) | {name for module in step.from_tail_linear for name in inside[module]
                                  if name != tails[module]}
    return frozenset(name for name in reached if name not in skipped)
