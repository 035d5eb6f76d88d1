//! `dfship demo`: a local cluster, a generated dataset, Python UDF queries.

use std::path::Path;
use std::time::{Duration, Instant};

use arrow::util::pretty::pretty_format_batches;
use clap::Args;
use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_codec::CodecOptions;
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use indicatif::{ProgressBar, ProgressStyle};

use crate::local_cluster::LocalCluster;
use dfship_distributed::describe_udfs;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Worker processes to start on 127.0.0.1.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Rows of the generated `trips` table.
    #[arg(long, default_value_t = 400_000)]
    pub rows: usize,
    /// Show the workers' logs here instead of writing them to files.
    #[arg(long)]
    pub verbose: bool,
}

// Shared with `python -m dfship demo` (python/dfship/demo.py).
const DEMO_UDFS: &str = include_str!("../../../python/dfship/_demo_udfs.py");
const DEMO_QUERIES: &str = include_str!("../../../python/dfship/_demo_queries.sql");
const FILES: usize = 8;

/// The `(title, sql)` pairs of `_demo_queries.sql`: a line starting with
/// `-- title: ` starts a query, which ends at its semicolon; other `--`
/// lines are comments.
fn queries() -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for line in DEMO_QUERIES.lines() {
        if let Some(title) = line.strip_prefix("-- title: ") {
            out.push((title.trim(), String::new()));
        } else if let Some((_, sql)) = out.last_mut().filter(|_| !line.starts_with("--")) {
            sql.push(' ');
            sql.push_str(line.split(';').next().unwrap_or(""));
        }
    }
    for (_, sql) in &mut out {
        *sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    out
}

const FFI_QUERY: (&str, &str) = (
    "an FFI UDF (by name, loaded by every worker) on a Python UDF's result",
    "SELECT city_key(city) AS key, fnv1a_hash(city_key(city)) AS hash, count(*) AS trips \
     FROM trips GROUP BY city_key(city), fnv1a_hash(city_key(city)) ORDER BY key",
);

/// Writes `trips` (FILES Parquet files) and `zones` under `dir`.
async fn generate_dataset(dir: &Path, rows: usize) -> Result<()> {
    let ctx = SessionContext::new();
    let per_file = rows.div_ceil(FILES).max(1);
    for file in 0..FILES {
        let (from, to) = (file * per_file, ((file + 1) * per_file).min(rows));
        if from >= to {
            break;
        }
        ctx.sql(&format!(
            "COPY (SELECT v AS trip_id, \
               CASE v % 5 WHEN 0 THEN ' Lisbon' WHEN 1 THEN 'Porto ' WHEN 2 THEN 'FARO' WHEN 3 THEN 'braga' ELSE 'Lisbon' END AS city, \
               CAST((v * 7919) % 2500 AS DOUBLE) / 100.0 AS distance_km, \
               CAST((v * 104729) % 6000 AS DOUBLE) / 100.0 AS fare, \
               to_timestamp(1735689600 + v * 37) AS started_at \
             FROM generate_series({from}, {}) AS t(v)) TO '{}' STORED AS PARQUET",
            to - 1,
            dir.join("trips").join(format!("part-{file}.parquet")).display()
        ))
        .await?
        .collect()
        .await?;
    }
    ctx.sql(&format!(
        "COPY (SELECT * FROM (VALUES ('lisbon', 'South'), ('faro', 'South'), ('porto', 'North'), ('braga', 'North')) \
           AS z(key, zone)) TO '{}' STORED AS PARQUET",
        dir.join("zones").join("zones.parquet").display()
    ))
    .await?
    .collect()
    .await?;
    Ok(())
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message);
    bar
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = tempfile::tempdir()
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let bar = spinner(format!(
        "generating {} trips into {}",
        args.rows,
        dir.path().display()
    ));
    generate_dataset(dir.path(), args.rows).await?;
    bar.finish_with_message(format!(
        "generated {} trips ({FILES} Parquet files) and 4 zones",
        args.rows
    ));

    // The example FFI UDF, built next to this binary by `cargo build --workspace`.
    let ffi_spec = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("libdfship_ffi_example.so")))
        .filter(|library| library.exists())
        .map(|library| format!("{}:dfship_ffi_scalar_udf", library.display()));
    let mut worker_args: Vec<String> = ffi_spec
        .iter()
        .flat_map(|spec| ["--ffi-udf".to_string(), spec.clone()])
        .collect();
    // A fresh key for this cluster, so other users of the machine cannot use
    // the workers: in a folder of its own (mkdtemp: this user's only), not
    // in /tmp, where UDFs make files (workers close the key to their UDF
    // runners, and with it new entries of the folders on the way to it).
    let key_dir = key_folder()?;
    let key_file = key_dir.path().join("cluster.key");
    let key = dfship_distributed::write_cluster_key_file(&key_file)?;
    worker_args.extend([
        "--cluster-key-file".to_string(),
        key_file.display().to_string(),
    ]);
    let bar = spinner(format!("starting {} worker processes", args.workers));
    // Outside the dataset's temporary directory, so the logs outlive the
    // demo; a fresh folder of an unpredictable name, this user's only
    // (mkdtemp), so nobody can prepare it or a symlink in its place.
    let log_dir = if args.verbose {
        None
    } else {
        let dir = tempfile::Builder::new()
            .prefix("dfship-demo-logs-")
            .tempdir()
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        Some(dir.keep())
    };
    let cluster = LocalCluster::start(args.workers, &worker_args, log_dir.as_deref())?;
    bar.finish_with_message(format!(
        "{} workers: {}",
        args.workers,
        cluster.urls.join(", ")
    ));
    if let Some(log_dir) = &log_dir {
        println!(
            "worker logs: {}/worker-*.log (or run with --verbose to see them here)",
            log_dir.display()
        );
    }

    let udf_file = dir.path().join("demo_udfs.py");
    std::fs::write(&udf_file, DEMO_UDFS)
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let inline = InlineUdfs::new(CodecOptions::default().with_optional_cluster_key(Some(key)));
    let mut builder = ClusterContextBuilder::new(&cluster.urls)?;
    if let Some(spec) = &ffi_spec {
        builder = builder.with_udf(dfship_distributed::load_ffi_udf(spec)?);
    }
    let ctx = builder
        .with_config(SessionConfig::new().with_target_partitions(args.workers.max(2) * 2))
        .with_inline_udfs(inline.clone())
        // Spread even this small dataset over every worker.
        .with_file_scan_bytes_per_partition(1)
        .with_python_udfs_from_file(&udf_file)?
        .build()?;
    for table in ["trips", "zones"] {
        crate::cluster::register_table(&ctx, table, &dir.path().join(table)).await?;
    }

    let ffi_query = ffi_spec.as_ref().map(|_| FFI_QUERY);
    if ffi_query.is_none() {
        println!("(the FFI example library is not built next to this binary: skipping the FFI UDF query)");
    }
    let ffi_query = ffi_query.map(|(title, sql)| (title, sql.to_string()));
    for (index, (title, sql)) in queries().iter().chain(ffi_query.iter()).enumerate() {
        println!("\n== {title}\n{sql}");
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        if index == 0 {
            println!(
                "{}",
                datafusion_distributed::display_plan_ascii(plan.as_ref(), false)
            );
        }
        println!("{}", describe_udfs(&ctx, &plan));
        let bar = spinner("running".to_string());
        let started = Instant::now();
        let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx()).await?;
        let elapsed = started.elapsed();
        bar.finish_and_clear();
        println!(
            "{}\n{} rows in {elapsed:.2?}",
            pretty_format_batches(&batches)?,
            batches.iter().map(|b| b.num_rows()).sum::<usize>()
        );
    }
    let stats = inline.encoder().stats();
    println!(
        "\nshipped {} stage plans carrying {} inline Python UDF calls ({} payload bytes); no worker registered a UDF",
        stats.plans, stats.inline_udfs, stats.inline_bytes
    );
    Ok(())
}

/// A fresh owner-only folder for a cluster key: under `$XDG_RUNTIME_DIR`,
/// else `/var/tmp`, else the default temporary folder.
fn key_folder() -> Result<tempfile::TempDir> {
    let parent = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([std::path::PathBuf::from("/var/tmp")])
        .find(|dir| dir.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("dfship-key-")
        .tempdir_in(&parent)
        .or_else(|_| tempfile::Builder::new().prefix("dfship-key-").tempdir())
        .map_err(|e| {
            DataFusionError::Execution(format!(
                "cannot make a folder for the demo's cluster key in {}: {e}",
                parent.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::queries;

    #[test]
    fn the_shared_demo_queries_parse_into_titled_statements() {
        let queries = queries();
        assert_eq!(queries.len(), 5, "{queries:?}");
        for (title, sql) in &queries {
            assert!(!title.is_empty() && !title.contains('\n'), "{title:?}");
            assert!(sql.starts_with("SELECT "), "{title}: {sql}");
            assert!(!sql.contains(';') && !sql.contains("--"), "{title}: {sql}");
        }
    }
}
