"""UDF declarations: a callable plus the signature it is shipped with.

``udf`` declares a scalar UDF, ``udaf`` an aggregate UDF (an accumulator
class with ``update``, ``merge``, ``state`` and ``evaluate``) and ``udwf`` a
window UDF (an evaluator class with ``evaluate_all``, ``evaluate`` or
``evaluate_all_with_rank``), in the function and decorator forms of
``datafusion.udf``/``udaf``/``udwf``. Accumulators and evaluators may
subclass ``datafusion.Accumulator``/``WindowEvaluator`` but need not: the
engine only calls the methods.

A scalar UDF may be a class whose instances are callable: each runner that
serves it creates one instance, on its first call, and reuses it for every
batch and query while the runner lives (load a model once per process;
``functools.partial(Model, path)`` passes arguments to ``__init__``). It may
be ``async`` (an ``async def`` function, or ``async def __call__``): its calls
then run concurrently on the runner's event loop.

Every declaration takes three keyword options, which travel with the UDF to
every worker: ``batch_size`` (each call sees at most this many rows),
``concurrency`` (at most this many runners per worker hold the UDF; its
calls queue for them) and ``max_in_flight`` (an async UDF's calls in flight
on one runner; default 32).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

_VOLATILITIES = ("immutable", "stable", "volatile")
_OPTION_LIMITS = {"batch_size": 2**32 - 1, "concurrency": 2**16 - 1, "max_in_flight": 2**16 - 1}


def _check_options(**options: int | None) -> dict[str, int | None]:
    for key, value in options.items():
        if value is None:
            continue
        limit = _OPTION_LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{key} must be an integer from 1 to {limit}, got {value!r}")
    return dict(options)


def _class_of(func: Any) -> type | None:
    """The class ``func`` instantiates when it is a class (or a ``functools.partial`` of one)."""
    target = func.func if isinstance(func, functools.partial) else func
    return target if isinstance(target, type) else None


def _is_async(func: Any) -> bool:
    cls = _class_of(func)
    call = cls.__call__ if cls is not None else func
    return inspect.iscoroutinefunction(call) or (
        cls is None and inspect.iscoroutinefunction(type(func).__call__)
    )


def _check_volatility(volatility: str) -> str:
    volatility = str(volatility).lower()
    if volatility not in _VOLATILITIES:
        raise ValueError(f"volatility must be one of {', '.join(_VOLATILITIES)}, got {volatility!r}")
    return volatility


def _check_types(what: str, types: Sequence[pa.DataType] | pa.DataType) -> list[pa.DataType]:
    types = [types] if isinstance(types, pa.DataType) else list(types)
    for position, data_type in enumerate(types):
        if not isinstance(data_type, pa.DataType):
            raise TypeError(f"{what}[{position}] must be a pyarrow.DataType, got {data_type!r}")
    return types


def _check_return(return_type: pa.DataType | pa.Field) -> pa.DataType | pa.Field:
    if not isinstance(return_type, (pa.DataType, pa.Field)):
        raise TypeError(f"return_type must be a pyarrow.DataType or pyarrow.Field, got {return_type!r}")
    return return_type


def _default_name(factory: Any, what: str) -> str:
    name = str(getattr(factory, "__name__", ""))
    if not name or name == "<lambda>":
        raise ValueError(f"a lambda has no name: pass name=... to {what}()")
    return name.lower() if isinstance(factory, type) else name


class PythonUDF:
    """A Python scalar UDF: ``func`` maps pyarrow arrays to a pyarrow array.

    ``func`` may be a function, an ``async def`` function, or a class whose
    instances are callable (``__call__``, which may be ``async``): each runner
    makes one instance, on its first call, and keeps it.

    Calling the declaration calls ``func`` here (a class: one local instance).
    ``__dfship_udf__`` describes it to the engine.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        input_types: Sequence[pa.DataType],
        return_type: pa.DataType | pa.Field,
        volatility: str,
        name: str | None = None,
        *,
        batch_size: int | None = None,
        concurrency: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if not callable(func):
            raise TypeError(f"udf() needs a callable or a class, got {type(func).__name__}")
        volatility = _check_volatility(volatility)
        input_types = _check_types("input_types", input_types)
        _check_return(return_type)
        options = _check_options(batch_size=batch_size, concurrency=concurrency, max_in_flight=max_in_flight)
        self.func = func
        self.is_class = _class_of(func) is not None
        self.is_async = _is_async(func)
        self.name = name or _default_name(_class_of(func) or func, "udf")
        self.input_types = list(input_types)
        self.return_type = return_type
        self.volatility = volatility
        self.batch_size, self.concurrency, self.max_in_flight = batch_size, concurrency, max_in_flight
        self._instance: Any = None
        self.__dfship_udf__ = {
            "name": self.name,
            "func": func,
            "input_types": self.input_types,
            "return_type": return_type,
            "volatility": volatility,
            **options,
        }

    def __call__(self, *args: Any) -> Any:
        if not self.is_class:
            return self.func(*args)
        if self._instance is None:
            self._instance = self.func()
        return self._instance(*args)

    def __repr__(self) -> str:
        types = ", ".join(str(t) for t in self.input_types)
        kind = ("async " if self.is_async else "") + ("class " if self.is_class else "")
        return f"PythonUDF({kind}{self.name}({types}) -> {self.return_type}, {self.volatility})"


def udf(
    func: Callable[..., Any] | Sequence[pa.DataType] | None = None,
    input_types: Sequence[pa.DataType] | pa.DataType | pa.Field | None = None,
    return_type: pa.DataType | pa.Field | str | None = None,
    volatility: str | None = None,
    name: str | None = None,
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    max_in_flight: int | None = None,
) -> Any:
    """Declare a scalar UDF, like ``datafusion.udf``.

    Function form: ``udf(func, input_types, return_type, volatility, name=None, **options)``.
    Decorator form: ``@udf(input_types, return_type, volatility, name=None, **options)``
    on a function or a class. Options: ``batch_size``, ``concurrency``,
    ``max_in_flight`` (see the module docs).
    """
    options = {"batch_size": batch_size, "concurrency": concurrency, "max_in_flight": max_in_flight}
    if callable(func):
        if input_types is None or return_type is None or volatility is None:
            raise TypeError("udf(func, input_types, return_type, volatility, name=None)")
        return PythonUDF(func, input_types, return_type, volatility, name, **options)
    # Decorator form: the arguments shift left by one.
    decorator_inputs, decorator_return, decorator_volatility = func, input_types, return_type
    decorator_name = volatility if name is None else name
    if decorator_inputs is None or decorator_return is None or decorator_volatility is None:
        raise TypeError("@udf(input_types, return_type, volatility, name=None)")
    _check_options(**options)

    def wrap(f: Callable[..., Any]) -> PythonUDF:
        return PythonUDF(
            f, decorator_inputs, decorator_return, decorator_volatility, decorator_name, **options
        )

    return wrap


class PythonUDAF:
    """A Python aggregate UDF: ``accumulator()`` makes a fresh accumulator.

    The accumulator has ``update(*arrays)``, ``merge(states: list[pa.Array])``,
    ``state() -> list`` (one value per state type) and ``evaluate()``. On a
    cluster, partial aggregates on some workers are merged on others through
    ``state()``/``merge()``, so ``merge`` must accept what ``state`` returns.
    """

    def __init__(
        self,
        accumulator: Callable[[], Any],
        input_types: Sequence[pa.DataType] | pa.DataType,
        return_type: pa.DataType | pa.Field,
        state_types: Sequence[pa.DataType] | pa.DataType,
        volatility: str,
        name: str | None = None,
        *,
        batch_size: int | None = None,
        concurrency: int | None = None,
    ) -> None:
        if not callable(accumulator):
            raise TypeError(f"udaf() needs an accumulator class or factory, got {type(accumulator).__name__}")
        self.accumulator = accumulator
        self.name = name or _default_name(accumulator, "udaf")
        self.input_types = _check_types("input_types", input_types)
        self.return_type = _check_return(return_type)
        self.state_types = _check_types("state_types", state_types)
        if not self.state_types:
            raise ValueError("udaf() needs at least one state type (one per value state() returns)")
        self.volatility = _check_volatility(volatility)
        options = _check_options(batch_size=batch_size, concurrency=concurrency)
        self.__dfship_udf__ = {
            "kind": "aggregate",
            "name": self.name,
            "func": accumulator,
            "input_types": self.input_types,
            "return_type": self.return_type,
            "state_types": self.state_types,
            "volatility": self.volatility,
            **options,
        }

    def __repr__(self) -> str:
        types = ", ".join(str(t) for t in self.input_types)
        states = ", ".join(str(t) for t in self.state_types)
        return f"PythonUDAF({self.name}({types}) -> {self.return_type}, state [{states}], {self.volatility})"


class PythonUDWF:
    """A Python window UDF: ``evaluator()`` makes a fresh evaluator per partition.

    The evaluator implements ``evaluate_all(values, num_rows)``, or
    ``evaluate(values, (start, end))`` with ``uses_window_frame()`` returning
    True, or ``evaluate_all_with_rank(num_rows, ranks)`` with
    ``include_rank()`` returning True, as ``datafusion.WindowEvaluator``.
    """

    def __init__(
        self,
        evaluator: Callable[[], Any],
        input_types: Sequence[pa.DataType] | pa.DataType,
        return_type: pa.DataType | pa.Field,
        volatility: str,
        name: str | None = None,
        *,
        concurrency: int | None = None,
    ) -> None:
        if not callable(evaluator):
            raise TypeError(f"udwf() needs an evaluator class or factory, got {type(evaluator).__name__}")
        self.evaluator = evaluator
        self.name = name or _default_name(evaluator, "udwf")
        self.input_types = _check_types("input_types", input_types)
        self.return_type = _check_return(return_type)
        self.volatility = _check_volatility(volatility)
        options = _check_options(concurrency=concurrency)
        self.__dfship_udf__ = {
            "kind": "window",
            "name": self.name,
            "func": evaluator,
            "input_types": self.input_types,
            "return_type": self.return_type,
            "volatility": self.volatility,
            **options,
        }

    def __repr__(self) -> str:
        types = ", ".join(str(t) for t in self.input_types)
        return f"PythonUDWF({self.name}({types}) -> {self.return_type}, {self.volatility})"


def _is_types(value: Any) -> bool:
    """Whether ``value`` opens the decorator form (input types) rather than the function form."""
    return value is None or isinstance(value, (pa.DataType, list, tuple))


def udaf(
    accumulator: Any = None,
    input_types: Any = None,
    return_type: Any = None,
    state_types: Any = None,
    volatility: Any = None,
    name: str | None = None,
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
) -> Any:
    """Declare an aggregate UDF, like ``datafusion.udaf``.

    Function form: ``udaf(accumulator, input_types, return_type, state_types, volatility, name=None)``.
    Decorator form: ``@udaf(input_types, return_type, state_types, volatility, name=None)`` on the
    accumulator class (or a function returning an accumulator). ``batch_size``: each
    ``update``/``merge`` sees at most this many rows; ``concurrency``: at most this many
    runners per worker hold its accumulators.
    """
    options = {"batch_size": batch_size, "concurrency": concurrency}
    if not _is_types(accumulator):
        if input_types is None or return_type is None or state_types is None or volatility is None:
            raise TypeError("udaf(accumulator, input_types, return_type, state_types, volatility, name=None)")
        return PythonUDAF(accumulator, input_types, return_type, state_types, volatility, name, **options)
    inputs, returns, states = accumulator, input_types, return_type
    decorator_volatility = state_types
    decorator_name = volatility if name is None else name
    if inputs is None or returns is None or states is None or decorator_volatility is None:
        raise TypeError("@udaf(input_types, return_type, state_types, volatility, name=None)")

    _check_options(**options)

    def wrap(factory: Callable[[], Any]) -> PythonUDAF:
        return PythonUDAF(factory, inputs, returns, states, decorator_volatility, decorator_name, **options)

    return wrap


def udwf(
    evaluator: Any = None,
    input_types: Any = None,
    return_type: Any = None,
    volatility: Any = None,
    name: str | None = None,
    *,
    concurrency: int | None = None,
) -> Any:
    """Declare a window UDF, like ``datafusion.udwf``.

    Function form: ``udwf(evaluator, input_types, return_type, volatility, name=None)``.
    Decorator form: ``@udwf(input_types, return_type, volatility, name=None)`` on the evaluator
    class (or a function returning an evaluator). A call evaluates one whole partition (the
    evaluator's contract needs it), so window UDFs take no ``batch_size``; ``concurrency``: at
    most this many runners per worker hold it.
    """
    if not _is_types(evaluator):
        if input_types is None or return_type is None or volatility is None:
            raise TypeError("udwf(evaluator, input_types, return_type, volatility, name=None)")
        return PythonUDWF(evaluator, input_types, return_type, volatility, name, concurrency=concurrency)
    inputs, returns, decorator_volatility = evaluator, input_types, return_type
    decorator_name = volatility if name is None else name
    if inputs is None or returns is None or decorator_volatility is None:
        raise TypeError("@udwf(input_types, return_type, volatility, name=None)")

    _check_options(concurrency=concurrency)

    def wrap(factory: Callable[[], Any]) -> PythonUDWF:
        return PythonUDWF(
            factory, inputs, returns, decorator_volatility, decorator_name, concurrency=concurrency
        )

    return wrap
