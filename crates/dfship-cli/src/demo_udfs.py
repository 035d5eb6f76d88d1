"""Python UDFs of `dfship demo`; they reach the workers inline, never registered there."""

import pyarrow as pa
import pyarrow.compute as pc

from dfship import udf


@udf([pa.float64(), pa.float64()], pa.float64(), "immutable")
def fare_per_km(fare: pa.Array, distance: pa.Array) -> pa.Array:
    """Vectorized: pyarrow.compute on whole arrays."""
    return pc.divide(fare, pc.max_element_wise(distance, 0.1))


@udf([pa.float64()], pa.string(), "immutable")
def fare_band(fare: pa.Array) -> pa.Array:
    """Per-row Python: a plain loop, bound by the GIL (workers run it in parallel)."""
    bands = []
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
