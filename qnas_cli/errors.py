"""Errors a user can fix. The CLI turns them into one line on stderr and exit code 2."""
from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a wrong option, file or value. The message says what to do instead."""


def choice_error(field: str, value: object, legal: Iterable[object]) -> UserError:
    """The one-line message for a value outside its legal set."""
    legal_text = ", ".join(str(v) for v in legal)
    return UserError(f"{field}: {value!r} is not allowed (legal values: {legal_text})")


def check_count(option: str, value: int | None, hint: str = "") -> None:
    """A count or size option (images, steps, batch size) is a positive integer; ``None`` means its default."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise UserError(f"{option} must be a positive integer, got {value}{hint}")
