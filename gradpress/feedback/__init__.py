"""Error feedback (error compensation) for compressed gradients: ECQ-SGD, classic EF, EF21.

``gradpress.feedback.get("ecq", alpha=0.5, beta=0.9)`` builds one by name; names are
``"none"``, ``"ecq"``, ``"ef"``, ``"ef21"``. See :mod:`gradpress.feedback.base` for the
protocol (``to_send`` / ``commit`` / ``apply``) and each module for its paper and equation.
"""

from __future__ import annotations

from typing import Any

from gradpress.feedback.base import Feedback, NoFeedback
from gradpress.feedback.ecq import ECQFeedback
from gradpress.feedback.ef import ErrorFeedback
from gradpress.feedback.ef21 import EF21

_BY_NAME: dict[str, type[Feedback]] = {
    "none": NoFeedback,
    "ecq": ECQFeedback,
    "ef": ErrorFeedback,
    "ef21": EF21,
}


def get(name: str, **kwargs: Any) -> Feedback:
    """Build the feedback ``name`` (``"none"``, ``"ecq"``, ``"ef"``, ``"ef21"``)."""
    try:
        cls = _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown feedback {name!r}; available: {', '.join(available())}"
                         ) from None
    return cls(**kwargs)


def available() -> list[str]:
    """Feedback names, sorted."""
    return sorted(_BY_NAME)


__all__ = ["EF21", "ECQFeedback", "ErrorFeedback", "Feedback", "NoFeedback", "available",
           "get"]
