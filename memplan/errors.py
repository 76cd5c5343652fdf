"""User-facing errors: each says what failed, the value with its unit, and the fix."""


class MemplanError(ValueError):
    """Base class of every error memplan raises for bad user input."""


class TraceError(MemplanError):
    """No tracer produced a graph that matches the model's eager outputs."""


class BudgetError(MemplanError):
    """The requested memory budget is below the smallest feasible peak.

    ``min_feasible_bytes`` is the smallest peak memplan can reach with the options given;
    ``rev_min_bytes`` is what REV substitution could reach (None when unknown or REV is on).
    """

    def __init__(self, message: str, *, budget_bytes: int, min_feasible_bytes: int,
                 rev_min_bytes: int | None = None):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes
        self.rev_min_bytes = rev_min_bytes


class PlanMismatchError(MemplanError):
    """A saved plan was made for a different graph than the model given."""


class PlanFileError(MemplanError):
    """A saved plan is malformed: not a JSON object, a missing, unknown or mistyped field."""
