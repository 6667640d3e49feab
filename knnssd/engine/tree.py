"""Token trees: one verify pass over many candidate continuations, keeping the longest one the target agrees with.

A tree draft is `Draft(tokens, probs=None, parents=...)` (see `knnssd.engine.drafters.base`): k nodes, node i holding
tokens[i] and following node parents[i] (-1: the last committed token, the root). Nodes are in topological order
(parents[i] < i), so a node's depth (1 for a child of the root) is one more than its parent's.

One verify pass (`knnssd.engine.decoding.verify`) runs the full model over [last token, node 0, ..., node k-1]
(width k + 1):
- positions: the root sits at `position`, node i at position + depth(i), so each node is computed at the position
  it would have on its own path;
- attention: `tree_mask` lets row 0 (the root) and row 1 + i (node i) see the committed cache and their own
  ancestors (themselves included), nothing else; sliding-window layers also drop keys beyond their window,
  as transformers' own masks do;
- acceptance (`accept_greedy`): node i is accepted when its parent was (or is the root) and its token is the
  target's argmax after its parent; the deepest accepted node (the first in node order among equals) ends the
  accepted path, and the target's argmax after it is the bonus token. That is exactly what verifying the path
  alone would accept, so greedy output stays token-identical to plain decoding;
- the cache (`knnssd.engine.kvcache.keep_tail`, then `rollback`): the accepted nodes' keys and values move to the slots
  right after the root's and everything else is cropped, so the cache holds only committed tokens again.

Under sampling the loop verifies only the tree's first path (`first_path`) with the single-path rejection
sampling of `knnssd.engine.sampling`: the tree's tokens are chosen deterministically, so q is a point mass and the
output distribution stays the target's.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.drafters.base import Draft
from knnssd.errors import KnnSsdError
from knnssd.engine.kvcache import keep_tail, rollback

MASKS_BY_IMPLEMENTATION = {"sdpa": "bool", "knnssd_grouped_sdpa": "bool", "eager": "float"}


def check_tree(draft: Draft, who: str) -> None:
    """Refuse a malformed tree from drafter `who`: parents must be (k,) int64 with -1 <= parents[i] < i,
    and its tokens chosen deterministically (probs None)."""
    parents, k = draft.parents, draft.tokens.shape[0]
    fix = ("give parents as a (k,) int64 tensor, parents[i] the index of node i's parent (-1 for the last "
           "committed token), nodes in topological order, and probs=None")
    if parents is None:
        return
    if parents.dtype != torch.long or parents.dim() != 1 or parents.shape[0] != k:
        raise KnnSsdError(f"drafter {who} proposed a tree whose parents have shape {tuple(parents.shape)} and dtype "
                          f"{parents.dtype}, for {k} tokens", fix=fix)
    if k and (bool((parents < -1).any()) or bool((parents >= torch.arange(k, device=parents.device)).any())):
        raise KnnSsdError(f"drafter {who} proposed a tree whose parents are not in topological order: "
                          f"{parents.tolist()}", fix=fix)
    if draft.probs is not None:
        raise KnnSsdError(f"drafter {who} proposed a tree with draft distributions", fix=fix)


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (1 for a child of the root), for parents in topological order."""
    result: list[int] = []
    for parent in parents:
        result.append(1 if parent < 0 else result[parent] + 1)
    return result


def nodes_per_depth(draft: Draft) -> list[int] | None:
    """How many nodes lie at depth 1, 2, ... of a tree draft; None for a path."""
    if draft.parents is None:
        return None
    counts: list[int] = []
    for depth in depths(draft.parents.tolist()):
        counts.extend([0] * (depth - len(counts)))
        counts[depth - 1] += 1
    return counts


def select(draft: Draft, nodes: list[int]) -> Draft:
    """The sub-tree of `nodes` (increasing indices, closed under ancestors), re-indexed; a path (parents None)
    when it is one."""
    parents = draft.parents.tolist()
    new_index = {old: new for new, old in enumerate(nodes)}
    kept = [new_index[parents[old]] if parents[old] >= 0 else -1 for old in nodes]
    tokens = draft.tokens[torch.tensor(nodes, dtype=torch.long, device=draft.tokens.device)]
    is_path = all(parent == i - 1 for i, parent in enumerate(kept))
    return Draft(tokens=tokens, probs=None, forwards=draft.forwards,
                 parents=None if is_path else torch.tensor(kept, dtype=torch.long, device=draft.tokens.device))


def within_depth(draft: Draft, max_depth: int) -> Draft:
    """The tree without its nodes deeper than `max_depth` (their descendants are deeper still); a path
    (parents None) when what is left is one."""
    return select(draft, [i for i, depth in enumerate(depths(draft.parents.tolist())) if depth <= max_depth])


def first_path(draft: Draft) -> Draft:
    """The tree's first path as a path draft: node 0, then each node's first child in node order."""
    parents = draft.parents.tolist()
    path: list[int] = []
    for i, parent in enumerate(parents):
        if parent == (path[-1] if path else -1):
            path.append(i)
    return select(draft, path)


def ancestors(parents: list[int]) -> torch.Tensor:
    """(k + 1, k + 1) bool: [i, j] is True when row j is row i or one of its ancestors; row 0 is the root,
    row 1 + n node n."""
    k = len(parents)
    seen = torch.zeros(k + 1, k + 1, dtype=torch.bool)
    seen[:, 0] = True
    for node, parent in enumerate(parents):
        seen[node + 1] = seen[parent + 1]
        seen[node + 1, node + 1] = True
    return seen


def tree_mask(model: PreTrainedModel, cache: DynamicCache, parents: list[int],
              position: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask of a tree's verify pass, as the model's forward takes a prepared one.

    Per layer kind: (1, 1, k + 1, kv) with kv the keys the cache layer shows a (k + 1)-token pass
    (`get_mask_sizes`, read before the pass); bool (True: attend) for SDPA, additive float for eager attention.
    One tensor when every layer shows the same keys; else a dict by `config.layer_types` (Qwen2's forward takes it).
    """
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    kind = MASKS_BY_IMPLEMENTATION.get(implementation)
    if kind is None:
        raise KnnSsdError(f"token-tree drafts need SDPA or eager attention, the model uses {implementation!r}",
                          fix="load the model with attn_implementation='sdpa', or use a single-path drafter")
    device = next(model.parameters()).device
    width = len(parents) + 1
    tree = ancestors(parents).to(device)  # (width, width)
    query_positions = position + torch.tensor([0] + depths(parents), device=device)  # (width,)
    masks: dict[tuple[int, int, int | None], torch.Tensor] = {}
    by_layer = []
    for index, layer in enumerate(cache.layers):
        kv_length, kv_offset = cache.get_mask_sizes(width, index)
        window = getattr(layer, "sliding_window", None)
        key = (kv_length, kv_offset, window)
        if key not in masks:
            committed = kv_length - width
            key_positions = torch.cat([kv_offset + torch.arange(committed, device=device), query_positions])
            allowed = torch.cat([torch.ones(width, committed, dtype=torch.bool, device=device), tree], dim=1)
            if window is not None:
                allowed &= key_positions[None, :] > query_positions[:, None] - window
            mask = allowed[None, None]
            if kind == "float":
                dtype = next(model.parameters()).dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
            masks[key] = mask
        by_layer.append(key)
    if len(masks) == 1:
        return next(iter(masks.values()))
    layer_types = getattr(model.config, "layer_types", None)
    by_type: dict[str, torch.Tensor] = {}
    for key, layer_type in zip(by_layer, layer_types or []):
        if by_type.setdefault(layer_type, masks[key]) is not masks[key]:
            layer_types = None
    if not layer_types:
        raise KnnSsdError("token-tree drafts need the same attention keys in every layer of a kind; this model's "
                          "cache layers differ", fix="use a single-path drafter with this model")
    return by_type


def accept_greedy(tokens: list[int], parents: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy acceptance over a tree.

    Args:
        tokens: the k node tokens; parents: the k parent indices (-1 = root).
        logits: (k + 1, vocab), row 0 after the root, row 1 + i after node i.
    Returns:
        (path, next_token): the accepted nodes root to leaf (the deepest accepted node, the first in node order
        among equally deep ones) and the target's argmax after the path's last node (or after the root).
    """
    return accept_targets(tokens, parents, logits.argmax(dim=-1).tolist())


def accept_targets(tokens: list[int], parents: list[int], targets: list) -> tuple[list[int], object]:
    """`accept_greedy` given the target's choices instead of its logits: targets[0] after the root, targets[1 + i]
    after node i (any value; one that equals no token, e.g. None where the choice is unknown, accepts nothing).
    Replay (`pipeline.replay`) calls it with plain decoding's continuation as the targets."""
    accepted = [False] * len(tokens)
    node_depths = depths(parents)
    best = -1
    for i, (token, parent) in enumerate(zip(tokens, parents)):
        accepted[i] = (parent < 0 or accepted[parent]) and token == targets[parent + 1]
        if accepted[i] and (best < 0 or node_depths[i] > node_depths[best]):
            best = i
    path: list[int] = []
    node = best
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1], targets[best + 1]


def first_nodes(draft: Draft, count: int) -> Draft:
    """The tree's first `count` nodes (node order is topological, so they are closed under ancestors); a path when
    what is left is one. A batch's token budget (`knnssd.engine.budget`) cuts trees this way."""
    return draft if draft.tokens.shape[0] <= count else select(draft, list(range(count)))


def conclude_tree(cache: DynamicCache, input_ids: torch.Tensor, draft: Draft, logits: torch.Tensor, position: int,
                  on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> tuple[list[int], int]:
    """After a tree's verify pass over input_ids (width,) = [last token, node 0, ..., node k-1] (at `position`; the
    cache then holds position + width entries) with logits (width, vocab): greedy acceptance, and the cache left
    holding the committed tokens (position + 1 + accepted). Returns (accepted tokens, next token).
    `on_logits(tokens (n,), logits (n, vocab))`, when given, gets the committed rows: the root's and the accepted
    path's (a session's `observe_logits`)."""
    parents = draft.parents.tolist()
    tokens = draft.tokens.tolist()
    width = len(tokens) + 1
    path, next_token = accept_greedy(tokens, parents, logits)
    if on_logits is not None:
        rows = torch.tensor([0] + [1 + node for node in path], device=logits.device)
        on_logits(input_ids[rows], logits[rows])
    keep_tail(cache, width, [0] + [1 + node for node in path])
    rollback(cache, position + 1 + len(path))
    return [tokens[node] for node in path], next_token
