"""Cheap pickling of the slotted dataclasses that cross the listener channel (a leaf).

Python 3.11 pickles a ``slots=True`` dataclass through ``dataclasses._dataclass_getstate``
and ``_dataclass_setstate``, which call ``dataclasses.fields()`` on every object, both
ways: under load a profile showed a "stored" notice (a ``QueuedMessage`` with its
``Envelope``, ``QueueState`` and ``Recipient`` objects) costing about 17 µs to dump and
12 µs to load, an admission's ``Limits`` 3 µs each way, where a plain tuple costs 0.5 µs.
``pickled_by_fields`` gives a class a ``__reduce__`` that pickles it as its class and its
field values in ``__init__`` order, read by one ``operator.attrgetter`` built once.

Loading calls the constructor with every field, so defaults and factories play no part,
a frozen class is built the ordinary way, and a ``__post_init__`` would run again (the
classes decorated here have none; tests/listenproc/test_pickling.py checks). The
decorator refuses a class whose ``__init__`` does not take exactly its fields,
positionally and in order (``init=False`` or ``kw_only`` fields, an ``InitVar``, a
hand-written ``__init__``), and a subclass not decorated itself refuses to pickle rather
than lose its own fields. Pickles made the dataclass way (by a relay before this one)
still load: the dataclass keeps its ``__setstate__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def pickled_by_fields(cls: type[T]) -> type[T]:
    """Pickle ``cls`` (a dataclass; put this above ``@dataclass``) as ``cls(*fields)``."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"pickled_by_fields: {cls!r} is not a dataclass (put it above "
                        f"@dataclass)")
    names = tuple(f.name for f in dataclasses.fields(cls))
    params = list(inspect.signature(cls).parameters.values())
    if ([p.name for p in params] != list(names)
            or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params)):
        raise TypeError(f"pickled_by_fields: {cls.__qualname__}'s __init__ does not take "
                        f"exactly its fields {names} positionally")
    values: Callable[[Any], tuple[Any, ...]]
    if len(names) > 1:
        values = operator.attrgetter(*names)
    else:                                # attrgetter of one name gives no tuple
        values = lambda obj: tuple(getattr(obj, n) for n in names)  # noqa: E731

    def __reduce__(self: T) -> tuple[type[T], tuple[Any, ...]]:
        if type(self) is not cls:
            raise TypeError(f"{type(self).__qualname__} subclasses {cls.__qualname__}: "
                            f"decorate it with pickled_by_fields too")
        return cls, values(self)

    __reduce__.__qualname__ = f"{cls.__qualname__}.__reduce__"
    cls.__reduce__ = __reduce__  # type: ignore[assignment,method-assign]
    return cls
