"""Statistics of one generation, with their formulas.

Definitions (one "verification step" = one full-model forward over the last
committed token plus k >= 0 drafts; plain decoding is the case k = 0):

- new_tokens            = tokens emitted after the prompt (the prefill's token included)
- drafted_tokens        = sum over steps of k (for a token tree, k is its node count)
- accepted_tokens       = sum over steps of drafts accepted (the bonus token not counted)
- verify_steps          = number of verification steps
- draft_forwards        = forward passes of the draft model (a dropped low-confidence token costs one)
- acceptance_rate       = accepted_tokens / drafted_tokens
- mean_accepted_tokens  = (accepted_tokens + verify_steps) / verify_steps
                          tokens committed per verification step, the bonus token counted
                          (1.0 for plain decoding); the last step may be cut short by EOS or
                          max_new_tokens, which this formula ignores
  Both are computed in one place, `Tally`, which also pools them over many generations (sum the counts,
  then divide). The one rule for an empty denominator: the figure is 0.0 (nothing drafted; no verification
  step at all, as when max_new_tokens is 1 and the prefill alone gives the token).
- mean_verify_width     = (drafted_tokens + verify_steps) / verify_steps
                          tokens per verify pass, the last committed token counted (1.0 for plain decoding)
- acceptance_by_position[i] = accepted drafts at position i / drafts made at position i (0-based; a tree's
                          node at depth d counts as a draft at position d - 1, so several drafts may share one)
- verify_widths[w - 1]  = verify passes over w tokens (the k drafts plus the last committed token)
- tree_steps            = verify passes whose draft was a token tree (not one path)
- prefill_seconds, draft_seconds, verify_seconds: wall time in each phase
  (CUDA work synchronised before each reading)
- total_seconds         = prefill_seconds + draft_seconds + verify_seconds + the loop's own overhead
- tokens_per_second     = new_tokens / total_seconds
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Tally:
    """Counts that pool over generations; the ratios of the module docstring, with its one empty-case rule.

    Example:
        >>> total = sum((Tally.of(r.stats) for r in results), Tally())
        >>> total.mean_accepted_tokens, total.acceptance_rate
    """

    accepted: int = 0
    drafted: int = 0
    steps: int = 0

    @classmethod
    def of(cls, stats: "GenerationStats") -> "Tally":
        return cls(accepted=stats.accepted_tokens, drafted=stats.drafted_tokens, steps=stats.verify_steps)

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.accepted + other.accepted, self.drafted + other.drafted, self.steps + other.steps)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def mean_verify_width(self) -> float:
        return (self.drafted + self.steps) / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class GenerationStats:
    """Frozen figures of one generation; see the module docstring for formulas."""

    new_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    verify_steps: int
    draft_forwards: int
    drafted_by_position: tuple[int, ...]
    accepted_by_position: tuple[int, ...]
    prefill_seconds: float
    draft_seconds: float
    verify_seconds: float
    total_seconds: float
    verify_widths: tuple[int, ...] = ()
    tree_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return Tally.of(self).acceptance_rate

    @property
    def mean_verify_width(self) -> float:
        return Tally.of(self).mean_verify_width

    @property
    def mean_accepted_tokens(self) -> float:
        return Tally.of(self).mean_accepted_tokens

    @property
    def acceptance_by_position(self) -> tuple[float, ...]:
        return tuple(a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict: stored fields plus the derived figures."""
        data: dict[str, object] = asdict(self)
        data["drafted_by_position"] = list(self.drafted_by_position)
        data["accepted_by_position"] = list(self.accepted_by_position)
        data["verify_widths"] = list(self.verify_widths)
        data["mean_verify_width"] = self.mean_verify_width
        data["acceptance_rate"] = self.acceptance_rate
        data["mean_accepted_tokens"] = self.mean_accepted_tokens
        data["acceptance_by_position"] = list(self.acceptance_by_position)
        data["tokens_per_second"] = self.tokens_per_second
        return data


@dataclass
class StatsRecorder:
    """Mutable tally that the decoding loop fills in, then freezes with `finish`."""

    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    verify_widths: list[int] = field(default_factory=list)
    verify_steps: int = 0
    tree_steps: int = 0
    draft_forwards: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def record_step(self, drafted: int, accepted: int, forwards: int = 0,
                    by_depth: list[int] | None = None) -> None:
        """One verification step that checked `drafted` drafts, accepted `accepted` of them, after `forwards`
        draft-model passes. A path's drafts lie one per position (the first `accepted` accepted); a token
        tree's `by_depth[d]` nodes lie at position d (its `accepted` path one node per position)."""
        by_depth = [1] * drafted if by_depth is None else by_depth
        if sum(by_depth) != drafted or accepted > len(by_depth):
            raise ValueError(f"{drafted} drafts, {accepted} accepted do not fit nodes per depth {by_depth}")
        self.draft_forwards += forwards
        grow = len(by_depth) - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position.extend([0] * grow)
            self.accepted_by_position.extend([0] * grow)
        for position, count in enumerate(by_depth):
            self.drafted_by_position[position] += count
            if position < accepted:
                self.accepted_by_position[position] += 1
        self.verify_widths.extend([0] * (drafted + 1 - len(self.verify_widths)))
        self.verify_widths[drafted] += 1
        self.tree_steps += any(count > 1 for count in by_depth)
        self.verify_steps += 1

    def finish(self, new_tokens: int, total_seconds: float) -> GenerationStats:
        return GenerationStats(
            new_tokens=new_tokens,
            drafted_tokens=sum(self.drafted_by_position),
            accepted_tokens=sum(self.accepted_by_position),
            verify_steps=self.verify_steps,
            draft_forwards=self.draft_forwards,
            drafted_by_position=tuple(self.drafted_by_position),
            accepted_by_position=tuple(self.accepted_by_position),
            prefill_seconds=self.prefill_seconds,
            draft_seconds=self.draft_seconds,
            verify_seconds=self.verify_seconds,
            total_seconds=total_seconds,
            verify_widths=tuple(self.verify_widths),
            tree_steps=self.tree_steps,
        )
