"""The shared / personal split of a model's parameter names, without torch (``models.flat`` and
``models.seed_init`` both split by it)."""

from __future__ import annotations

from models.spec import ModelSpec


class ModelStateError(ValueError):
    """Arrays that do not fit the model: missing or unexpected names, wrong shapes."""


def split(spec: ModelSpec, names: list[str]) -> tuple[list[str], list[str]]:
    """``(shared, personal)`` among a model's parameter names, in their order.

    A ``personal`` prefix that matches no parameter is an error (a typo would otherwise silently send the head
    that was meant to stay home); so is a model whose every parameter is personal.
    """
    for prefix in spec.personal:
        if not any(n.startswith(prefix) for n in names):
            raise ModelStateError(
                f"personal prefix {prefix!r} matches no parameter; parameters are: {', '.join(names)}"
            )
    personal = [n for n in names if any(n.startswith(p) for p in spec.personal)]
    shared = [n for n in names if n not in personal]
    if not shared:
        raise ModelStateError("every parameter is personal; nothing would be federated")
    return shared, personal
