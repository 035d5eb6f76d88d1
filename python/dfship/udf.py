"""UDF declarations: a callable plus the signature it is shipped with.

``udf`` declares a scalar UDF, ``udaf`` an aggregate UDF (an accumulator
class with ``update``, ``merge``, ``state`` and ``evaluate``) and ``udwf`` a
window UDF (an evaluator class with ``evaluate_all``, ``evaluate`` or
``evaluate_all_with_rank``), in the function and decorator forms of
``datafusion.udf``/``udaf``/``udwf``. Accumulators and evaluators may
subclass ``datafusion.Accumulator``/``WindowEvaluator`` but need not: the
engine only calls the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

_VOLATILITIES = ("immutable", "stable", "volatile")


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

    Calling it calls ``func``. ``__dfship_udf__`` describes it to the engine.
    """

    def __init__(
        self,
        func: Callable[..., pa.Array],
        input_types: Sequence[pa.DataType],
        return_type: pa.DataType | pa.Field,
        volatility: str,
        name: str | None = None,
    ) -> None:
        if not callable(func):
            raise TypeError(f"udf() needs a callable, got {type(func).__name__}")
        volatility = _check_volatility(volatility)
        input_types = _check_types("input_types", input_types)
        _check_return(return_type)
        self.func = func
        self.name = name or getattr(func, "__name__", None) or "udf"
        if self.name == "<lambda>":
            raise ValueError("a lambda has no name: pass name=... to udf()")
        self.input_types = list(input_types)
        self.return_type = return_type
        self.volatility = volatility
        self.__dfship_udf__ = {
            "name": self.name,
            "func": func,
            "input_types": self.input_types,
            "return_type": return_type,
            "volatility": volatility,
        }

    def __call__(self, *args: Any) -> Any:
        return self.func(*args)

    def __repr__(self) -> str:
        types = ", ".join(str(t) for t in self.input_types)
        return f"PythonUDF({self.name}({types}) -> {self.return_type}, {self.volatility})"


def udf(
    func: Callable[..., pa.Array] | Sequence[pa.DataType] | None = None,
    input_types: Sequence[pa.DataType] | pa.DataType | pa.Field | None = None,
    return_type: pa.DataType | pa.Field | str | None = None,
    volatility: str | None = None,
    name: str | None = None,
) -> Any:
    """Declare a scalar UDF, like ``datafusion.udf``.

    Function form: ``udf(func, input_types, return_type, volatility, name=None)``.
    Decorator form: ``@udf(input_types, return_type, volatility, name=None)``.
    """
    if callable(func):
        if input_types is None or return_type is None or volatility is None:
            raise TypeError("udf(func, input_types, return_type, volatility, name=None)")
        return PythonUDF(func, input_types, return_type, volatility, name)
    # Decorator form: the arguments shift left by one.
    decorator_inputs, decorator_return, decorator_volatility = func, input_types, return_type
    decorator_name = volatility if name is None else name
    if decorator_inputs is None or decorator_return is None or decorator_volatility is None:
        raise TypeError("@udf(input_types, return_type, volatility, name=None)")

    def wrap(f: Callable[..., pa.Array]) -> PythonUDF:
        return PythonUDF(f, decorator_inputs, decorator_return, decorator_volatility, decorator_name)

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
        self.__dfship_udf__ = {
            "kind": "aggregate",
            "name": self.name,
            "func": accumulator,
            "input_types": self.input_types,
            "return_type": self.return_type,
            "state_types": self.state_types,
            "volatility": self.volatility,
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
    ) -> None:
        if not callable(evaluator):
            raise TypeError(f"udwf() needs an evaluator class or factory, got {type(evaluator).__name__}")
        self.evaluator = evaluator
        self.name = name or _default_name(evaluator, "udwf")
        self.input_types = _check_types("input_types", input_types)
        self.return_type = _check_return(return_type)
        self.volatility = _check_volatility(volatility)
        self.__dfship_udf__ = {
            "kind": "window",
            "name": self.name,
            "func": evaluator,
            "input_types": self.input_types,
            "return_type": self.return_type,
            "volatility": self.volatility,
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
) -> Any:
    """Declare an aggregate UDF, like ``datafusion.udaf``.

    Function form: ``udaf(accumulator, input_types, return_type, state_types, volatility, name=None)``.
    Decorator form: ``@udaf(input_types, return_type, state_types, volatility, name=None)`` on the
    accumulator class (or a function returning an accumulator).
    """
    if not _is_types(accumulator):
        if input_types is None or return_type is None or state_types is None or volatility is None:
            raise TypeError("udaf(accumulator, input_types, return_type, state_types, volatility, name=None)")
        return PythonUDAF(accumulator, input_types, return_type, state_types, volatility, name)
    inputs, returns, states = accumulator, input_types, return_type
    decorator_volatility = state_types
    decorator_name = volatility if name is None else name
    if inputs is None or returns is None or states is None or decorator_volatility is None:
        raise TypeError("@udaf(input_types, return_type, state_types, volatility, name=None)")

    def wrap(factory: Callable[[], Any]) -> PythonUDAF:
        return PythonUDAF(factory, inputs, returns, states, decorator_volatility, decorator_name)

    return wrap


def udwf(
    evaluator: Any = None,
    input_types: Any = None,
    return_type: Any = None,
    volatility: Any = None,
    name: str | None = None,
) -> Any:
    """Declare a window UDF, like ``datafusion.udwf``.

    Function form: ``udwf(evaluator, input_types, return_type, volatility, name=None)``.
    Decorator form: ``@udwf(input_types, return_type, volatility, name=None)`` on the evaluator
    class (or a function returning an evaluator).
    """
    if not _is_types(evaluator):
        if input_types is None or return_type is None or volatility is None:
            raise TypeError("udwf(evaluator, input_types, return_type, volatility, name=None)")
        return PythonUDWF(evaluator, input_types, return_type, volatility, name)
    inputs, returns, decorator_volatility = evaluator, input_types, return_type
    decorator_name = volatility if name is None else name
    if inputs is None or returns is None or decorator_volatility is None:
        raise TypeError("@udwf(input_types, return_type, volatility, name=None)")

    def wrap(factory: Callable[[], Any]) -> PythonUDWF:
        return PythonUDWF(factory, inputs, returns, decorator_volatility, decorator_name)

    return wrap
