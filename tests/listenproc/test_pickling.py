"""What crosses the listener channel pickles cheaply and comes back equal, field by field.

Every dataclass a listener process sends the main process (``relay.pickling``) is built
here from ``dataclasses.fields`` with a value other than its default in every field,
nested ones included, so a field added later is covered without touching this file (a
field of a type ``value_for`` does not know fails here, asking for a value).
"""

from __future__ import annotations

import copyreg
import dataclasses
import enum
import io
import pickle
import types
import typing
from typing import Any

import pytest

from relay.connlimits import Limits
from relay.envelope import Envelope
from relay.pickling import pickled_by_fields
from relay.spool.records import QueuedMessage, QueueState, RcptStatus, Recipient

pytestmark = pytest.mark.fast

# The classes the channel carries: Limits in each admission request, a QueuedMessage (its
# Envelope, QueueState and Recipients) in each "stored" notice.
CHANNEL_CLASSES: list[type[Any]] = [Limits, Envelope, Recipient, QueueState, QueuedMessage]


def value_for(hint: Any, seed: int) -> Any:
    """A value of type ``hint`` that no field default of these classes equals."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return True                          # every bool field defaults to False
    if hint is int:
        return 1000 + seed
    if hint is float:
        return 1700000000.25 + seed
    if hint is str:
        return f"value-{seed}@example.net"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return list(hint)[-1]                # not the first member, the usual default
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return sample(hint, seed)
    if origin is tuple and args[1:] == (Ellipsis,):
        return tuple(value_for(args[0], seed + i) for i in range(2))
    if origin is list:
        return [value_for(args[0], seed + 10 * i) for i in range(1, 3)]
    if origin is dict:
        return {value_for(args[0], seed): value_for(args[1], seed + 1)}
    raise AssertionError(f"no test value for a field of type {hint!r}: add one to value_for")


def sample(cls: type[Any], seed: int = 0) -> Any:
    """An instance of ``cls`` with a non-default value in every field."""
    hints = typing.get_type_hints(cls)
    values = {f.name: value_for(hints[f.name], seed + i)
              for i, f in enumerate(dataclasses.fields(cls))}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            assert values[f.name] != f.default, f"{cls.__name__}.{f.name}"
        if f.default_factory is not dataclasses.MISSING:
            assert values[f.name] != f.default_factory(), f"{cls.__name__}.{f.name}"
    return cls(**values)


def assert_same(got: Any, want: Any, where: str) -> None:
    """Equal, and of the same type all the way down (a list stays a list, an enum an enum)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    assert got == want, where
    if dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    elif isinstance(want, list | tuple):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")


def round_trip(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


@pytest.mark.parametrize("cls", CHANNEL_CLASSES, ids=lambda c: c.__name__)
def test_every_field_survives_the_round_trip(cls: type[Any]) -> None:
    obj = sample(cls)
    assert_same(round_trip(obj), obj, cls.__name__)


@pytest.mark.parametrize("cls", CHANNEL_CLASSES, ids=lambda c: c.__name__)
def test_pickles_as_the_constructor_and_the_field_values(cls: type[Any]) -> None:
    """Not through dataclasses' __getstate__, which costs a dataclasses.fields() per object."""
    obj = sample(cls)
    assert obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL) == (
        cls, tuple(getattr(obj, f.name) for f in dataclasses.fields(cls)))


@pytest.mark.parametrize("cls", CHANNEL_CLASSES, ids=lambda c: c.__name__)
def test_loading_has_no_side_effect_beyond_the_constructor(cls: type[Any]) -> None:
    """Loading calls the constructor: a __post_init__ would run again on every load."""
    assert not hasattr(cls, "__post_init__"), (
        f"{cls.__name__} has a __post_init__: check it may run again when the channel "
        f"loads one, then drop it from this test")


def test_the_messages_the_channel_carries_come_back_whole() -> None:
    msg = sample(QueuedMessage)
    stored = ("note", "stored", (msg, b"x" * 1200))
    admit = ("req", 1, "admit", (1, "smtp", "192.0.2.1", Limits(total=200, per_client=20)))
    assert_same(round_trip(stored), stored, "stored")
    assert_same(round_trip(admit), admit, "admit")


def test_a_loaded_message_is_independent_and_mutable_like_the_original() -> None:
    msg = sample(QueuedMessage)
    got = round_trip(msg)
    got.state.recipients[0].status = RcptStatus.DELIVERED
    got.state.recipients.append(Recipient("late@example.net"))
    got.extra["k"] = "v"
    assert msg.state.recipients[0].status is not RcptStatus.DELIVERED
    assert len(msg.state.recipients) == 2 and "k" not in msg.extra
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.envelope.sender = "other@example.net"


def test_pickles_of_the_dataclass_default_way_still_load() -> None:
    """What a listener process of the previous version sends (__getstate__/__setstate__)."""
    class Before(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                return copyreg.__newobj__, (type(obj),), obj.__getstate__()
            return NotImplemented
    msg = sample(QueuedMessage)
    buf = io.BytesIO()
    Before(buf, pickle.HIGHEST_PROTOCOL).dump(msg)
    assert b"__newobj__" not in buf.getvalue()   # NEWOBJ opcode, not a call of copyreg's
    assert_same(pickle.loads(buf.getvalue()), msg, "msg")


# ---- the decorator on its own ----------------------------------------------------------------


@pickled_by_fields
@dataclasses.dataclass(frozen=True, slots=True)
class One:
    only: list[int]


@pickled_by_fields
@dataclasses.dataclass(slots=True)
class Empty:
    pass


@pickled_by_fields
@dataclasses.dataclass(slots=True)
class Defaults:
    a: int = 1
    b: list[int] = dataclasses.field(default_factory=list)


def test_one_field_and_no_field_classes_round_trip() -> None:
    assert_same(round_trip(One([1, 2])), One([1, 2]), "One")
    assert_same(round_trip(Empty()), Empty(), "Empty")
    assert_same(round_trip(Defaults(2, [3])), Defaults(2, [3]), "Defaults")
    assert round_trip(Defaults()).b is not Defaults().b          # not a shared default


def test_an_undecorated_subclass_refuses_to_pickle_rather_than_lose_its_fields() -> None:
    @dataclasses.dataclass(slots=True)
    class More(Defaults):
        c: int = 3

    with pytest.raises(TypeError, match="decorate it"):
        pickle.dumps(More(), pickle.HIGHEST_PROTOCOL)


def field_kinds() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("init=False", {"x": dataclasses.field(default=0, init=False)}),
        ("kw_only", {"x": dataclasses.field(default=0, kw_only=True)}),
    ]


@pytest.mark.parametrize(("kind", "namespace"), field_kinds(), ids=[k for k, _ in field_kinds()])
def test_refuses_a_field_the_constructor_does_not_take_positionally(
        kind: str, namespace: dict[str, Any]) -> None:
    cls = types.new_class("Odd", (), {}, lambda ns: ns.update(
        {"__annotations__": {"a": int, "x": int}, **namespace}))
    with pytest.raises(TypeError, match="does not take exactly its fields"):
        pickled_by_fields(dataclasses.dataclass(slots=True)(cls))


def test_refuses_an_init_var_and_a_class_that_is_no_dataclass() -> None:
    @dataclasses.dataclass
    class WithInitVar:
        a: int
        seed: dataclasses.InitVar[int]

    with pytest.raises(TypeError, match="does not take exactly its fields"):
        pickled_by_fields(WithInitVar)
    with pytest.raises(TypeError, match="not a dataclass"):
        pickled_by_fields(int)
