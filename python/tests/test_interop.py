"""Plans made by datafusion-python 55 (PyPI) run on the cluster unchanged,
with the same results as in datafusion-python itself."""

from __future__ import annotations

import datafusion
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import PLAN_FORMS, plan_in_form, sorted_rows

import dfship

QUERIES = [
    "SELECT id, df_triple(id) AS t FROM facts WHERE id % 7 = 0",
    "SELECT category, sum(df_triple(id)) AS s, count(*) AS c FROM facts GROUP BY category",
    "SELECT f.category, d.weight, max(df_triple(f.id)) AS m FROM facts f "
    "JOIN dim d ON f.category = d.category GROUP BY f.category, d.weight",
    "SELECT df_label(category) AS l, count(*) AS c FROM facts WHERE df_triple(id) > 3000 "
    "GROUP BY df_label(category)",
]


def _register(local: datafusion.SessionContext) -> None:
    local.register_udf(
        datafusion.udf(lambda a: pc.multiply(a, 3), [pa.int64()], pa.int64(), "immutable", name="df_triple")
    )
    suffix = "!"  # captured state travels too
    local.register_udf(
        datafusion.udf(
            lambda s: pc.binary_join_element_wise(s, suffix, ""),
            [pa.string()],
            pa.string(),
            "stable",
            name="df_label",
        )
    )


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("form", PLAN_FORMS)
def test_datafusion_python_plans_run_distributed(
    query: str, form: str, ctx: dfship.ClusterContext, local: datafusion.SessionContext
) -> None:
    _register(local)
    plan = plan_in_form(local.sql(query), form)
    expected = local.sql(query).to_arrow_table()
    before = ctx.shipped()
    distributed = ctx.execute_datafusion_plan(plan)
    assert "Stage" in distributed.explain()
    actual = distributed.collect()
    assert expected.num_rows > 0
    assert sorted_rows(actual) == sorted_rows(expected)
    assert ctx.shipped()[1] > before[1], "the DFPYUDF UDFs were shipped inline to the workers"


def test_unsupported_input_gets_a_clear_error(ctx: dfship.ClusterContext) -> None:
    with pytest.raises(dfship.DfshipError, match="datafusion-python 55"):
        ctx.execute_datafusion_plan(b"definitely not a plan")
    with pytest.raises(TypeError, match="LogicalPlan or ExecutionPlan"):
        ctx.execute_datafusion_plan(42)
