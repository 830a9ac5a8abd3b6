"""What an evaluation finds wrong in its inputs once it has begun: reported in one line, exit status 1."""

from __future__ import annotations

from ..errors import MoELPRUserError


class EvaluationError(MoELPRUserError, ValueError):
    """Held-out data or kept scores that cannot be evaluated or compared as asked."""

    exit_status = 1
