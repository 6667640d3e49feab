"""Token choice: greedy, or sampling with temperature / top-k / top-p, and the
acceptance rules that keep speculative decoding lossless.

Greedy verification accepts the longest prefix of drafts that equal the target
model's argmax, then takes the target's argmax at the first mismatch (or after
the last draft) as the bonus token: the output is exactly greedy decoding.

Sampling verification is speculative rejection sampling (Leviathan et al. 2023,
Chen et al. 2023): draft token x ~ q is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from
normalise(max(p - q, 0)); if every draft is accepted a bonus token is drawn from
p at the next position. Every emitted token is then distributed as p, the
target model's (warped) distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knnssd.errors import KnnSsdError


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``temperature == 0`` means greedy (argmax).

    The target distribution p for sampling is softmax(logits / temperature),
    restricted to the `top_k` most likely tokens (0 = no limit) and then to the
    smallest set whose mass reaches `top_p` (1.0 = no limit), renormalised:
    the same warping as transformers' TemperatureLogitsWarper, TopKLogitsWarper
    and TopPLogitsWarper in that order.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise KnnSsdError(f"temperature must be >= 0, got {self.temperature}", fix="use 0 for greedy decoding")
        if not (0.0 < self.top_p <= 1.0):
            raise KnnSsdError(f"top_p must be in (0, 1], got {self.top_p}", fix="use 1.0 to disable top-p")
        if self.top_k < 0:
            raise KnnSsdError(f"top_k must be >= 0, got {self.top_k}", fix="use 0 to disable top-k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Sampling distribution from logits.

    Args:
        logits: (..., vocab) raw logits.
    Returns:
        (..., vocab) float32 probabilities, each row summing to 1.
    """
    scores = logits.float() / config.temperature
    if config.top_k > 0 and config.top_k < scores.shape[-1]:
        kth = torch.topk(scores, config.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - config.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `probs` (..., vocab) -> (...,) int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def verify_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy acceptance.

    Args:
        drafts: (k,) drafted token ids, k >= 0.
        target_logits: (k + 1, vocab) target logits at the positions that predict
            each draft and the token after the last draft.
    Returns:
        (n_accepted, next_token): drafts[:n_accepted] are accepted and
        `next_token` is the target's argmax after them.
    """
    target_ids = target_logits.argmax(dim=-1)  # (k + 1,)
    k = drafts.shape[0]
    matches = (target_ids[:k] == drafts).to(torch.int64)
    n_accepted = int(matches.cumprod(dim=0).sum()) if k else 0
    return n_accepted, int(target_ids[n_accepted])


def verify_sampling(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling.

    Args:
        drafts: (k,) drafted token ids, each drawn from the matching row of `draft_probs`.
        draft_probs: (k, vocab) the draft distributions q, or None for drafts proposed deterministically
            (prompt lookup): q is then the point mass on each draft, so a draft x is accepted with
            probability p(x) and a rejection draws from p with x removed.
        target_probs: (k + 1, vocab) the target distributions p.
    Returns:
        (n_accepted, next_token), with next_token drawn from the residual
        distribution at the first rejection, or from p after the last draft.
    """
    k = drafts.shape[0]
    if k:
        rows = torch.arange(k, device=drafts.device)
        p_x = target_probs[rows, drafts]
        q_x = draft_probs[rows, drafts] if draft_probs is not None else torch.ones_like(p_x)
        u = torch.rand(k, generator=generator, device=drafts.device)
        # accept iff u * q(x) < p(x)  <=>  u < p(x) / q(x), with u in [0, 1): probability min(1, p/q) exactly,
        # no division by q(x) = 0, and never a token the target gives p(x) = 0 (u = 0 would pass a "<=")
        accepted = (u * q_x < p_x).to(torch.int64)
        n_accepted = int(accepted.cumprod(dim=0).sum())
    else:
        n_accepted = 0
    if n_accepted < k:
        if draft_probs is not None:
            residual = (target_probs[n_accepted] - draft_probs[n_accepted]).clamp_min(0.0)
        else:  # max(p - point mass at x, 0): p without x
            residual = target_probs[n_accepted].clone()
            residual[drafts[n_accepted]] = 0.0
        mass = residual.sum()
        # p == q on this row (up to rounding): the residual is empty and p itself is exact
        dist = residual / mass if float(mass) > 1e-12 else target_probs[n_accepted]
    else:
        dist = target_probs[k]
    return n_accepted, int(sample(dist, generator))
