"""Errors a user can act on.

`InputError` carries every problem found in the inputs at once (torchtune-style config checks), each
rendered on one line that names the parameter, the bad value and the fix. `StepError` is a failure
found while working (Hub unreachable after retries, digest mismatch, ...): also one line, also
actionable. The CLI turns both into exit codes without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    field: str
    value: object
    message: str
    fix: str

    def __str__(self) -> str:
        value = self.value if isinstance(self.value, (int, float, bool)) else repr(str(self.value))
        return f"{self.field}={value}: {self.message}; fix: {self.fix}"


class InputError(ValueError):
    """One or more invalid inputs, found before any download or training."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class StepError(RuntimeError):
    """A failure while the step worked (remote down, corrupt file, ...), as one actionable line."""

    exit_code = 1

    def lines(self) -> list[str]:
        return [" ".join(str(self).split())]


class Problems:
    """Collects problems so a step can report all of them at once.

    >>> p = Problems(); p.require(False, "lr", -1, "must be > 0", "pass a positive number")
    """

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, field: str, value: object, message: str, fix: str) -> None:
        self.items.append(Problem(field, value, message, fix))

    def require(self, ok: bool, field: str, value: object, message: str, fix: str) -> bool:
        if not ok:
            self.add(field, value, message, fix)
        return ok

    def positive(self, field: str, value: float, *, allow_zero: bool = False) -> bool:
        ok = value >= 0 if allow_zero else value > 0
        need = ">= 0" if allow_zero else "> 0"
        return self.require(ok, field, value, f"must be {need}", f"pass a number {need}")

    def raise_if_any(self) -> None:
        if self.items:
            raise InputError(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """An error's text on one line, whitespace collapsed, cut to `limit` characters (for one-line reports)."""
    return " ".join(str(err).split())[:limit]
