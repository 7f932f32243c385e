"""torch's private compiler APIs the recipe uses: :func:`mark_dynamic` and :func:`compiler_exception`."""

from __future__ import annotations

import torch

__all__ = ["compiler_exception", "mark_dynamic"]


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """torch's ``maybe_mark_dynamic`` (private ``torch._dynamo``): the compiled graph takes any size in
    ``dim``; a model that needs a fixed size gets a static graph and one more compile, not an error."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def compiler_exception(error: BaseException) -> BaseException | None:
    """The compiler's own exception inside ``error`` (dynamo wraps the backend's in its private
    ``BackendCompilerFailed``; a lazily compiled backward raises inductor's directly), else None."""
    from torch._dynamo.exc import BackendCompilerFailed

    seen: BaseException | None = error
    for _ in range(8):  # the chain of causes is short; bound it anyway
        if seen is None:
            return None
        if isinstance(seen, BackendCompilerFailed):
            return getattr(seen, "inner_exception", None) or seen
        if type(seen).__module__.startswith("torch._inductor"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
