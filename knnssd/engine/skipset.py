"""`SkipSet`: which attention and MLP sub-layers the draft model skips.

The JSON form, the same in the CLI, in files and in bundles, is
``{"attn": [layer indices], "mlp": [layer indices]}`` with 0-based indices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from knnssd.errors import KnnSsdError
from knnssd.engine.jsonarg import json_source


@dataclass(frozen=True)
class SkipSet:
    """Sorted, de-duplicated layer indices whose attention / MLP sub-layer is skipped.

    A `SkipSet` alone does not know the model's depth; `validate(num_layers)`
    checks it against a model and is called before any drafting.

    Example:
        >>> s = SkipSet.from_json('{"attn": [3, 1], "mlp": [2]}')
        >>> s.attn, s.mlp, s.num_skipped
        ((1, 3), (2,), 3)
        >>> s.skip_ratio(num_layers=4)  # 3 of 2 * 4 sub-layers
        0.375
    """

    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for kind in ("attn", "mlp"):
            raw = getattr(self, kind)
            values = []
            for item in raw:
                if isinstance(item, bool) or not isinstance(item, int):
                    raise KnnSsdError(
                        f"skip set {kind!r} holds {item!r}, which is not a layer index",
                        fix='give integer layer indices, e.g. {"attn": [20, 21], "mlp": [25]}',
                    )
                if item < 0:
                    raise KnnSsdError(
                        f"skip set {kind!r} holds negative layer index {item}",
                        fix="layer indices are 0-based and non-negative",
                    )
                values.append(item)
            object.__setattr__(self, kind, tuple(sorted(set(values))))

    @property
    def num_skipped(self) -> int:
        """Number of skipped sub-layers: len(attn) + len(mlp)."""
        return len(self.attn) + len(self.mlp)

    @property
    def is_empty(self) -> bool:
        return self.num_skipped == 0

    def skip_ratio(self, num_layers: int) -> float:
        """Fraction of the model's 2 * num_layers sub-layers that are skipped."""
        return self.num_skipped / (2 * num_layers)

    def validate(self, num_layers: int) -> "SkipSet":
        """Check the indices against a model with `num_layers` decoder layers; return self."""
        for kind in ("attn", "mlp"):
            bad = [i for i in getattr(self, kind) if i >= num_layers]
            if bad:
                raise KnnSsdError(
                    f"skip set {kind!r} names layers {bad}, but the model has {num_layers} layers (0..{num_layers - 1})",
                    fix=f"use layer indices below {num_layers}",
                )
        if self.num_skipped == 2 * num_layers:
            raise KnnSsdError(
                "the skip set skips every attention and MLP sub-layer, so the draft model would ignore its input",
                fix="keep at least one sub-layer; published skip sets skip 35-50% of them",
            )
        return self

    def to_dict(self) -> dict[str, list[int]]:
        return {"attn": list(self.attn), "mlp": list(self.mlp)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "SkipSet":
        """Build from ``{"attn": [...], "mlp": [...]}``; both keys optional, no others allowed."""
        if not isinstance(data, dict):
            raise KnnSsdError(
                f"a skip set must be a JSON object, got {type(data).__name__}",
                fix='write it as {"attn": [layer indices], "mlp": [layer indices]}',
            )
        unknown = sorted(set(data) - {"attn", "mlp"})
        if unknown:
            raise KnnSsdError(
                f"unknown skip-set keys {unknown}",
                fix='use only "attn" and "mlp", each a list of 0-based layer indices',
            )
        parts: dict[str, tuple[int, ...]] = {}
        for kind in ("attn", "mlp"):
            value = data.get(kind, [])
            if not isinstance(value, (list, tuple)):
                raise KnnSsdError(
                    f"skip set {kind!r} must be a list of layer indices, got {value!r}",
                    fix=f'write e.g. "{kind}": [20, 21]',
                )
            parts[kind] = tuple(value)
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> "SkipSet":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KnnSsdError(
                f"the skip set is not valid JSON ({exc.msg} at character {exc.pos})",
                fix='write it as {"attn": [1, 2], "mlp": [3]} or give the path of a file holding that',
            ) from None
        return cls.from_dict(data)

    @classmethod
    def parse(cls, json_or_path: str) -> "SkipSet":
        """Read a skip set from inline JSON or from the path of a JSON file (as the CLI does)."""
        return cls.from_json(json_source(json_or_path, "--skip-set", '{"attn": [20], "mlp": []}'))

    @classmethod
    def of(cls, attn: Iterable[int] = (), mlp: Iterable[int] = ()) -> "SkipSet":
        return cls(attn=tuple(attn), mlp=tuple(mlp))
