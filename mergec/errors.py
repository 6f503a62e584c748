"""The one exception hierarchy of mergec.

Every error that mergec raises on purpose derives from :class:`MergecError`, so a caller can
catch them all at once. Messages name the pass, the node or argument at fault and what to do.
"""
from __future__ import annotations


class MergecError(Exception):
    """Base class of every error mergec raises."""


class TraceError(MergecError):
    """A model could not be exported to an fx graph."""


class SpecError(MergecError):
    """A unit spec is malformed, or does not fit the model it is applied to."""


class MergeError(MergecError):
    """Two models cannot be merged as asked (they do not correspond, a bad option, bad data)."""


class CheckpointError(MergecError):
    """A checkpoint or a saved merge result cannot be read."""


def require_extra(module: str, extra: str, needed_for: str) -> None:
    """Raises a MergecError naming the extra to install when ``module`` cannot be imported.

    >>> require_extra("math", "plots", "plots")  # a module that is there: nothing happens
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MergecError(f"{needed_for} needs {module}, which is not installed: "
                          f"pip install 'mergec[{extra}]'")
