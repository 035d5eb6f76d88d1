"""The ``udf`` declaration: a callable plus the signature it is shipped with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

_VOLATILITIES = ("immutable", "stable", "volatile")


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
        volatility = str(volatility).lower()
        if volatility not in _VOLATILITIES:
            raise ValueError(f"volatility must be one of {', '.join(_VOLATILITIES)}, got {volatility!r}")
        for position, data_type in enumerate(input_types):
            if not isinstance(data_type, pa.DataType):
                raise TypeError(f"input_types[{position}] must be a pyarrow.DataType, got {data_type!r}")
        if not isinstance(return_type, (pa.DataType, pa.Field)):
            raise TypeError(f"return_type must be a pyarrow.DataType or pyarrow.Field, got {return_type!r}")
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
