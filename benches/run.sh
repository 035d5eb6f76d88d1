#!/usr/bin/env bash
# Runs every benchmark in one go: the criterion micro benchmarks and counts,
# then the end-to-end comparison (datafusion-python, PySpark, dfship with 1
# and 2 workers) and the aggregate/window comparison. Results land in
# benches/results/ (results.md, results.png, micro.md, profile.md,
# aggregates.md, runners.md, recovery.md, object_store.md, isolation.md, udf_output.md). Takes about 35 minutes on two cores, most of it the
# release build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh >/dev/null
export VIRTUAL_ENV="$root/.venv"
out=benches/results
mkdir -p "$out"

echo "bench: release build of the worker, the CLI and the criterion benches"
# One build for both: with the benches selected too, cargo unifies dependency
# features so that `cargo bench` below finds DataFusion already compiled.
cargo build --release --locked -p dfship-worker -p dfship-cli -p dfship-benches --bins --benches

echo "bench: micro benchmarks (criterion)"
criterion() {
    cargo bench --locked -p dfship-benches "$@" -- --noplot --warm-up-time 1 --measurement-time 3 2>/dev/null \
        | grep -E '^[a-z_]+/|time:' | paste - - | sed -E 's/ +/ /g'
}
{
    echo "## Micro benchmarks"
    echo
    cargo bench --locked -p dfship-benches --bench counts 2>/dev/null | grep -E '^(\||###|$)'
    echo
    DFSHIP_WORKER_BIN="$root/target/release/dfship-worker" \
        cargo bench --locked -p dfship-benches --bench closures 2>/dev/null | grep -E '^(\||###|$)'
    echo
    .venv/bin/python benches/e2e/transport.py
    echo
    echo '### Criterion (median time per iteration)'
    echo
    echo '```'
    criterion --bench codec
    # Per-batch cost of one call, runner pool against in-process (side by side).
    DFSHIP_BENCH_PYTHON_MODE=pool criterion --bench invoke
    DFSHIP_BENCH_PYTHON_MODE=in-process criterion --bench invoke
    criterion --bench auth
    echo '```'
} > "$out/micro.md"
cat "$out/micro.md"

echo "bench: end to end"
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ]; then
    "${DFSHIP_BASE_PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum benches/e2e/requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r benches/e2e/requirements.txt
    echo "$want" > "$stamp"
fi
"$venv/bin/python" benches/e2e/run_e2e.py --out "$out" "$@"

echo "bench: aggregate and window UDFs"
"$venv/bin/python" benches/e2e/aggregates.py --out "$out"

echo "bench: class, async and model-loading UDFs"
"$venv/bin/python" benches/e2e/runners.py --out "$out"

echo "bench: recovery from a lost worker (the dfship wheel, release, in $venv)"
rm -f target/wheels-release/dfship-*.whl
(cd python && ../.venv/bin/maturin build --locked --release -i ../.venv/bin/python --out ../target/wheels-release)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/wheels-release/dfship-*.whl
"$venv/bin/python" benches/e2e/recovery.py --out "$out"

echo "bench: tables on an S3-compatible server (moto) against local disk"
"$venv/bin/python" benches/e2e/object_store.py --out "$out"

echo "bench: what authentication and query isolation cost per query"
"$venv/bin/python" benches/e2e/isolation.py --out "$out"

echo "bench: what bringing UDF output back to the client costs"
"$venv/bin/python" benches/e2e/udf_output.py --out "$out"

echo "bench: environments (a build, cached entries, a 5 MB working_dir)"
"$venv/bin/python" benches/e2e/environments.py --out "$out"

case " $* " in
*" --skip-spark "*) echo "bench: --skip-spark given, so no profile of the GIL-bound query against PySpark" ;;
*)
    echo "bench: profile of the GIL-bound query (py-spy, CPU per process)"
    "$venv/bin/python" benches/e2e/profile_gil_bound.py --out "$out"
    ;;
esac
