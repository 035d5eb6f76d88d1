"""Plain inline UDFs for the fault, skew and cluster-key tests."""

import socket
import time

import pyarrow as pa
import pyarrow.compute as pc

from dfship import udf


@udf([pa.int64()], pa.int64(), "immutable")
def py_double(values: pa.Array) -> pa.Array:
    return pc.multiply(values, 2)


@udf([pa.int64()], pa.int64(), "volatile")
def slow_double(values: pa.Array) -> pa.Array:
    """Sleeps 2 s per batch, so a query stays in flight long enough to break a worker under it."""
    time.sleep(2)
    return pc.multiply(values, 2)


@udf([pa.int64()], pa.int64(), "immutable")
def slow_double_immutable(values: pa.Array) -> pa.Array:
    """slow_double, declared immutable: a query calling it may run again on other workers."""
    time.sleep(2)
    return pc.multiply(values, 2)


@udf([pa.int64()], pa.string(), "immutable")
def whoami(values: pa.Array) -> pa.Array:
    """The host name of the worker container whose runner evaluates the batch."""
    return pa.array([socket.gethostname()] * len(values), pa.string())


@udf([pa.int64()], pa.int64(), "immutable")
def chatty_host(values: pa.Array) -> pa.Array:
    """Prints the worker container's host name: the output must reach the coordinator's client."""
    print(f"hello from {socket.gethostname()} ({len(values)} rows)")
    return values
