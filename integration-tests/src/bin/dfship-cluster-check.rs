//! Runs the query matrix (scalar, aggregate and window Python UDFs) on a cluster given by URL and compares every result
//! with single-node DataFusion running the same SQL and UDFs in this process.
//! The container tests run it inside the coordinator container:
//!
//! ```text
//! dfship-cluster-check --workers http://w1:8000,http://w2:8000 --data /data \
//!     [--ffi-udf /opt/dfship/lib/libdfship_ffi_example.so:dfship_ffi_scalar_udf] \
//!     [--cluster-key-file /keys/cluster.key]
//! ```
//!
//! With `--write-only` it only writes the dataset. With
//! `--datafusion-python-plans DIR` it also runs the datafusion-python plans
//! `containers/udfs/dfpy_plans.py` wrote there (`NAME.logical`,
//! `NAME.physical`) and compares them with datafusion-python's results
//! (`NAME.arrow`).
//!
//! Prints one `PASS name ...` or `FAIL name: why` line per query and exits
//! with status 1 if any failed. Writes the dataset under `--data` if absent
//! (workers must see it at the same path).

use std::path::PathBuf;
use std::process::ExitCode;

use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_codec::{ClusterKey, CodecOptions};
use dfship_distributed::{load_ffi_udf, ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::*;

/// The FFI example UDF (by name) next to an inline Python UDF.
const FFI_QUERY: &str = "SELECT category, fnv1a_hash(py_upper(category)) AS h, count(*) AS c \
                         FROM facts GROUP BY category, fnv1a_hash(py_upper(category))";

struct Args {
    workers: Vec<String>,
    data: PathBuf,
    ffi_udf: Option<String>,
    key_file: Option<PathBuf>,
    dfpy_plans: Option<PathBuf>,
    write_only: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut workers, mut data, mut ffi_udf, mut key_file) = (None, None, None, None);
    let mut dfpy_plans = None;
    let mut write_only = false;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--workers" => workers = Some(value()?.split(',').map(str::to_string).collect()),
            "--data" => data = Some(PathBuf::from(value()?)),
            "--ffi-udf" => ffi_udf = Some(value()?),
            "--cluster-key-file" => key_file = Some(PathBuf::from(value()?)),
            "--datafusion-python-plans" => dfpy_plans = Some(PathBuf::from(value()?)),
            "--write-only" => write_only = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        workers: workers.ok_or("--workers URL,URL,... is required")?,
        data: data.ok_or("--data DIR is required")?,
        ffi_udf,
        key_file,
        dfpy_plans,
        write_only,
    })
}

async fn run(args: Args) -> Result<bool> {
    init_python();
    if !args.data.join("facts").exists() {
        write_dataset(&args.data).await?;
    }
    if args.write_only {
        return Ok(true);
    }
    let key = args
        .key_file
        .as_ref()
        .map(ClusterKey::from_file)
        .transpose()?;
    let inline = InlineUdfs::new(CodecOptions::default().with_optional_cluster_key(key));
    let mut builder = ClusterContextBuilder::new(&args.workers)?
        .with_config(SessionConfig::new().with_target_partitions(args.workers.len()))
        .with_inline_udfs(inline.clone())
        .with_file_scan_bytes_per_partition(1);
    let local = SessionContext::new();
    for udf in matrix_udfs() {
        local.register_udf(udf.clone());
        builder = builder.with_python_udf(udf);
    }
    let mut queries: Vec<(&str, &str)> = MATRIX.to_vec();
    if let Some(spec) = &args.ffi_udf {
        let ffi = load_ffi_udf(spec)?;
        local.register_udf(ffi.as_ref().clone());
        builder = builder.with_udf(ffi);
        queries.push(("ffi_by_name_with_inline_python", FFI_QUERY));
    }
    let distributed = builder.build()?;
    register_aggregate_window_udfs(&local);
    register_aggregate_window_udfs(&distributed);
    queries.extend_from_slice(AGGREGATE_WINDOW_MATRIX);
    register_dataset(&local, &args.data).await?;
    register_dataset(&distributed, &args.data).await?;

    let mut all_passed = true;
    for (name, sql) in queries {
        let before = inline.encoder().stats();
        let outcome = async {
            let expected = sorted_rows(&local, sql).await?;
            let actual = sorted_rows(&distributed, sql).await?;
            let after = inline.encoder().stats();
            let (plans, udfs) = (
                after.plans - before.plans,
                after.inline_udfs - before.inline_udfs,
            );
            if expected.is_empty() {
                return Err(DataFusionError::Execution("no rows".into()));
            }
            if actual != expected {
                return Err(DataFusionError::Execution(format!(
                    "results differ: {} rows distributed vs {} single-node; first distributed {:?}, first single-node {:?}",
                    actual.len(),
                    expected.len(),
                    actual.first(),
                    expected.first()
                )));
            }
            if plans == 0 || udfs == 0 {
                return Err(DataFusionError::Execution(
                    "no stage plan carried an inline UDF".into(),
                ));
            }
            Ok(format!(
                "{} rows, {plans} stage plans carrying {udfs} inline UDF calls",
                expected.len()
            ))
        }
        .await;
        match outcome {
            Ok(detail) => println!("PASS {name}: {detail}"),
            Err(error) => {
                all_passed = false;
                println!("FAIL {name}: {error}");
            }
        }
    }
    if let Some(dir) = &args.dfpy_plans {
        all_passed &= run_datafusion_python_plans(&distributed, &inline, dir).await?;
    }
    Ok(all_passed)
}

/// Runs each datafusion-python plan in `dir` (logical and physical bytes)
/// on the cluster and compares with datafusion-python's own result.
async fn run_datafusion_python_plans(
    distributed: &SessionContext,
    inline: &InlineUdfs,
    dir: &std::path::Path,
) -> Result<bool> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let path = entry.path();
            (path.extension()? == "arrow")
                .then(|| path.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    names.sort();
    if names.is_empty() {
        println!("FAIL datafusion-python plans: none in {}", dir.display());
        return Ok(false);
    }
    let mut all_passed = true;
    for name in names {
        let file = std::fs::File::open(dir.join(format!("{name}.arrow")))?;
        let expected: Vec<_> = arrow::ipc::reader::FileReader::try_new(file, None)?
            .collect::<std::result::Result<_, _>>()?;
        let expected = sorted_batch_rows(&expected)?;
        for form in ["logical", "physical"] {
            let bytes = std::fs::read(dir.join(format!("{name}.{form}")))?;
            let codec = std::sync::Arc::clone(inline.codec());
            let outcome = async {
                let df = if form == "logical" {
                    dfship_distributed::dataframe_from_logical_bytes(distributed, codec, &bytes)
                        .await?
                } else {
                    dfship_distributed::dataframe_from_physical_bytes(distributed, codec, &bytes)
                        .await?
                };
                let actual = sorted_batch_rows(&df.collect().await?)?;
                if expected.is_empty() || actual != expected {
                    return Err(DataFusionError::Execution(format!(
                        "results differ: {} rows distributed vs {} in datafusion-python; first \
                         distributed {:?}, first datafusion-python {:?}",
                        actual.len(),
                        expected.len(),
                        actual.first(),
                        expected.first()
                    )));
                }
                Ok(actual.len())
            }
            .await;
            match outcome {
                Ok(rows) => println!("PASS {name}_{form}: {rows} rows equal datafusion-python's"),
                Err(error) => {
                    all_passed = false;
                    println!("FAIL {name}_{form}: {error}");
                }
            }
        }
    }
    Ok(all_passed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("dfship-cluster-check: {error}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("dfship-cluster-check: {error}");
            ExitCode::FAILURE
        }
    }
}
