"""Type checks for configuration values that arrive as JSON or from the command line.

JSON gives `"false"` (a truthy string), `2.5` where an integer is meant, or `"0.8"` where a number is meant;
each would otherwise fail mid-generation or, worse, switch a behaviour on silently. The frozen config classes
call these in `__post_init__`, so every way in (API, CLI, policy JSON, bundle) is checked the same way.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from knnssd.errors import KnnSsdError


def require_int(value: Any, name: str, example: str) -> None:
    """An int (not a bool, not a float such as 2.5)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnnSsdError(f"{name} must be an integer, got {value!r} ({type(value).__name__})",
                          fix=f"write it as a JSON number without quotes or decimals, e.g. {example}")


def require_number(value: Any, name: str, example: str) -> None:
    """An int or float (not a bool, not a string such as "0.8")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KnnSsdError(f"{name} must be a number, got {value!r} ({type(value).__name__})",
                          fix=f"write it as a JSON number without quotes, e.g. {example}")


def require_bool(value: Any, name: str) -> None:
    """A real bool: the string "false" is truthy, so it is refused rather than read as True."""
    if not isinstance(value, bool):
        raise KnnSsdError(f"{name} must be true or false, got {value!r} ({type(value).__name__})",
                          fix=f"write {name} as JSON true or false, without quotes")


def config_from_json(cls: type, data: dict[str, Any], where: str) -> Any:
    """`cls(**data)` for a frozen config dataclass, refusing keys it does not have (a misspelt field would
    otherwise be ignored and its default used)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise KnnSsdError(f"{where} has unknown fields {unknown}", fix=f"use only {', '.join(known)}")
    return cls(**data)
