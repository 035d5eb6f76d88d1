# mypy: disable-error-code="untyped-decorator,arg-type"
"""Python UDFs of `dfship demo` (scalar, aggregate, window); they reach the workers inline only."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dfship import udaf, udf, udwf


@udf([pa.float64(), pa.float64()], pa.float64(), "immutable")
def fare_per_km(fare: pa.Array, distance: pa.Array) -> pa.Array:
    """Vectorized: pyarrow.compute on whole arrays."""
    return pc.divide(fare, pc.max_element_wise(distance, 0.1))


@udf([pa.float64()], pa.string(), "immutable")
def fare_band(fare: pa.Array) -> pa.Array:
    """Per-row Python: a plain loop, bound by the GIL (workers run it in parallel)."""
    bands: list[str | None] = []
    for value in fare.to_pylist():
        if value is None:
            bands.append(None)
        elif value < 10:
            bands.append("budget")
        elif value < 30:
            bands.append("standard")
        else:
            bands.append("premium")
    return pa.array(bands, pa.string())


LONG_TRIP_KM = 12.0  # captured by the closure below


@udf([pa.float64()], pa.bool_(), "immutable")
def is_long_trip(distance: pa.Array) -> pa.Array:
    return pc.greater(distance, LONG_TRIP_KM)


@udf([pa.string()], pa.string(), "immutable")
def city_key(city: pa.Array) -> pa.Array:
    return pc.utf8_lower(pc.utf8_trim_whitespace(city))


@udaf([pa.float64()], pa.float64(), [pa.float64(), pa.int64()], "immutable", name="mean_fare")
class MeanFare:
    """An aggregate: partial (sum, count) states from each worker merge on another."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, fares: pa.Array) -> None:
        self.total += pc.sum(fares).as_py() or 0.0
        self.count += pc.count(fares).as_py()

    def merge(self, states: list[pa.Array]) -> None:
        self.total += pc.sum(states[0]).as_py() or 0.0
        self.count += pc.sum(states[1]).as_py() or 0

    def state(self) -> list[float | int]:
        return [self.total, self.count]

    def evaluate(self) -> float | None:
        return self.total / self.count if self.count else None


@udwf([pa.float64()], pa.float64(), "immutable", name="running_revenue")
class RunningRevenue:
    """A window function: the revenue so far within each partition."""

    def evaluate_all(self, values: list[pa.Array], num_rows: int) -> pa.Array:
        return pc.cumulative_sum(pc.fill_null(values[0], 0.0))
