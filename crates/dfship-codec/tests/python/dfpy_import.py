"""Runs, in datafusion-python (PyPI), plans this project encoded in DFPYUDF format.

Usage: python dfpy_import.py DIR

For each NAME.plan in DIR, decodes it with ``ExecutionPlan.from_bytes`` on a
fresh SessionContext that registered no UDF, runs every partition, and checks
the rows equal NAME.arrow. Prints ``ok NAME`` per plan; exits 1 on a mismatch.
"""

import sys
from pathlib import Path

import pyarrow as pa
from datafusion import ExecutionPlan, SessionContext


def run(ctx: SessionContext, plan: ExecutionPlan) -> pa.Table:
    batches = [
        batch.to_pyarrow()
        for partition in range(plan.partition_count)
        for batch in ctx.execute(plan, partition)
    ]
    return pa.Table.from_batches(batches)


def main(directory: Path) -> int:
    failures = 0
    plans = sorted(directory.glob("*.plan"))
    if not plans:
        print(f"no plans in {directory}")
        return 1
    for plan_path in plans:
        ctx = SessionContext()
        plan = ExecutionPlan.from_bytes(ctx, plan_path.read_bytes())
        actual = run(ctx, plan)
        expected = pa.ipc.open_file(str(plan_path.with_suffix(".arrow"))).read_all()
        if actual.combine_chunks().equals(expected.combine_chunks()):
            print(f"ok {plan_path.stem}")
        else:
            failures += 1
            print(f"MISMATCH {plan_path.stem}\nexpected:\n{expected}\nactual:\n{actual}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
