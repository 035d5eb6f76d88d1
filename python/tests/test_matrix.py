"""The distributed issue's query matrix, driven from Python: every result
equals single-node datafusion-python running the same SQL and UDFs."""

from __future__ import annotations

import sys

import cloudpickle
import datafusion
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import sorted_rows

import dfship

# Functions defined in a module travel by reference, and workers cannot
# import this test module: ship its code by value, the documented remedy.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMES = {0: "zero", 1: "one", 2: "two"}  # captured by py_bucket


def bucket(values: pa.Array) -> pa.Array:
    return pa.array(
        [None if v is None else NAMES.get(v % 3, "other") for v in values.to_pylist()], pa.string()
    )


POINT = pa.struct([pa.field("x", pa.int64()), pa.field("half", pa.float64())])

# (name, function, input types, return type): declared for both engines.
UDFS = [
    ("py_double", lambda a: pc.multiply(a, 2), [pa.int64()], pa.int64()),
    ("py_is_even", lambda a: pc.equal(pc.bit_wise_and(a, 1), 0), [pa.int64()], pa.bool_()),
    ("py_bucket", bucket, [pa.int64()], pa.string()),
    ("py_upper", lambda s: pc.utf8_upper(s), [pa.string()], pa.string()),
    ("py_hour", lambda t: pc.hour(t), [pa.timestamp("ns")], pa.int64()),
    ("py_tags_len", lambda v: pc.list_value_length(v), [pa.list_(pa.int64())], pa.int32()),
    (
        "py_scale",
        lambda v, k: pc.multiply(v, pc.cast(k, pa.float64())),
        [pa.float64(), pa.int64()],
        pa.float64(),
    ),
    (
        "py_point",
        lambda a: pa.StructArray.from_arrays(
            [a, pc.divide(pc.cast(a, pa.float64()), 2.0)], names=["x", "half"]
        ),
        [pa.int64()],
        POINT,
    ),
]

MATRIX = {
    "projection": "SELECT id, py_double(id) AS d FROM facts",
    "filter": "SELECT id FROM facts WHERE py_is_even(id) AND id < 500",
    "parquet_pushdown": "SELECT id, value FROM facts WHERE py_double(id) > 4700",
    "aggregate_argument": "SELECT category, sum(py_double(id)) AS s, max(py_scale(value, k)) AS m "
    "FROM facts GROUP BY category",
    "group_by_key": "SELECT py_bucket(k) AS b, count(*) AS c FROM facts GROUP BY py_bucket(k)",
    "join_key": "SELECT f.id, d.weight FROM facts f JOIN dim d ON py_upper(f.category) = d.ucat "
    "WHERE f.id % 97 = 0",
    "join_filter": "SELECT f.id, d.ucat FROM facts f JOIN dim d ON f.category = d.category "
    "AND py_is_even(f.id + d.weight) WHERE f.id < 300",
    "order_by": "SELECT id, category FROM facts ORDER BY py_double(id) DESC, id LIMIT 15",
    "window_argument": "SELECT id, sum(py_double(id)) OVER (PARTITION BY category ORDER BY id) AS r "
    "FROM facts WHERE id < 200",
    "case_branches": "SELECT id, CASE WHEN py_is_even(id) THEN py_upper(category) ELSE py_bucket(id) END "
    "AS c FROM facts WHERE id < 100",
    "nested_calls": "SELECT id, py_double(py_double(py_double(id))) AS d FROM facts WHERE id < 100",
    "nulls": "SELECT id, k, py_bucket(k) AS b, py_double(k) AS d FROM facts WHERE id < 60",
    "strings_timestamps_lists_structs": "SELECT id, py_upper(category) AS u, py_hour(ts) AS h, "
    "py_tags_len(tags) AS n, py_point(id) AS p FROM facts WHERE id % 50 = 0",
    "several_stages": "SELECT py_upper(c) AS c, s FROM (SELECT category AS c, sum(py_double(id)) AS s "
    "FROM facts WHERE py_is_even(id) GROUP BY category) t WHERE py_is_even(s)",
}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_matrix_query_matches_datafusion_python(
    name: str, ctx: dfship.ClusterContext, local: datafusion.SessionContext
) -> None:
    for udf_name, func, inputs, output in UDFS:
        ctx.register_udf(dfship.udf(func, inputs, output, "immutable", name=udf_name))
        local.register_udf(datafusion.udf(func, inputs, output, "immutable", name=udf_name))
    query = MATRIX[name]
    expected = local.sql(query).to_arrow_table()
    before = ctx.shipped()
    actual = ctx.sql(query).collect()
    after = ctx.shipped()
    assert expected.num_rows > 0
    assert actual.column_names == expected.column_names
    assert sorted_rows(actual) == sorted_rows(expected)
    assert after[0] > before[0] and after[1] > before[1], "stage plans carried the UDFs inline"
