"""A UDF that waits on a remote service for 50 ms per call of 50 rows, as an
async function and as a plain one (benches/e2e/runners.py)."""

import asyncio
import time

import pyarrow as pa
import pyarrow.compute as pc

from dfship import udf

LATENCY = 0.05


@udf([pa.int64()], pa.int64(), "immutable", name="async_lookup", batch_size=50, max_in_flight=64)
async def async_lookup(ids: pa.Array) -> pa.Array:
    await asyncio.sleep(LATENCY)
    return pc.add(ids, 1)


@udf([pa.int64()], pa.int64(), "immutable", name="sync_lookup", batch_size=50)
def sync_lookup(ids: pa.Array) -> pa.Array:
    time.sleep(LATENCY)
    return pc.add(ids, 1)
