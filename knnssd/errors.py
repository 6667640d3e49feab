"""The one error type users see for bad input.

Every `KnnSsdError` names the problem and the fix, so that the CLI can print it
as one line instead of a traceback. Anything else that escapes is a bug.
"""

from __future__ import annotations


class KnnSsdError(ValueError):
    """Bad input or an unusable environment, with the fix in the message.

    Example:
        >>> raise KnnSsdError("max_new_tokens must be >= 1, got 0", fix="pass --max-new-tokens 1 or more")
        Traceback (most recent call last):
        ...
        knnssd.errors.KnnSsdError: max_new_tokens must be >= 1, got 0 (fix: pass --max-new-tokens 1 or more)
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} (fix: {fix})" if fix else problem)


class BundleError(KnnSsdError):
    """A bundle that cannot be used: missing, tampered, truncated, or of another schema (`knnssd.bundle`)."""

    @classmethod
    def inconsistent(cls, folder: object, what: str) -> BundleError:
        """A bundle whose files disagree with each other or with the format: `what` says how."""
        return cls(f"bundle {folder} is inconsistent: {what}", fix="rebuild or re-publish the bundle")
