//! `dfship sql` and `dfship explain`: a coordinator context from flags.

use std::path::PathBuf;
use std::time::Instant;

use arrow::util::pretty::pretty_format_batches;
use clap::Args;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use dfship_codec::ClusterKey;
use dfship_settings::CoordinatorOptions;

/// Where the cluster is and what the query may use: every coordinator
/// setting (`dfship-settings`), the UDF files and the tables.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub options: CoordinatorOptions,

    /// Python files declaring UDFs with `dfship.udf`; they travel inline.
    #[arg(long = "udfs")]
    pub udf_files: Vec<PathBuf>,

    /// Tables as NAME=PATH (Parquet or CSV file or directory, by extension; workers must reach the path).
    #[arg(long = "table", value_parser = parse_table)]
    pub tables: Vec<(String, PathBuf)>,
}

fn parse_table(text: &str) -> std::result::Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not NAME=PATH"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Write the result to this file instead of printing it (.parquet or .csv).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Run the query this many times (for timing); prints one
    /// `dfship-timing run=I seconds=S rows=R` line per run to stderr and
    /// the result of the last run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Keep repeating the query until this many seconds have passed (at
    /// least --repeat runs); each timing line also carries a digest of the
    /// run's result, and a last `dfship-retries` line the retries made.
    #[arg(long, value_parser = dfship_settings::parse_duration)]
    pub repeat_for: Option<std::time::Duration>,
    /// The query.
    pub query: String,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Run the query, then show the plan with every task's metrics and each
    /// Python UDF's calls, rows and time per stage.
    #[arg(long)]
    pub analyze: bool,
    /// The query.
    pub query: String,
}

impl ClusterArgs {
    /// The cluster key, read once (file, else `DFSHIP_CLUSTER_KEY`, which is
    /// then removed from the environment); call it before Python starts.
    pub fn take_cluster_key(&self) -> Result<Option<ClusterKey>> {
        self.options.security.take_cluster_key()
    }

    pub async fn context(&self, key: Option<ClusterKey>) -> Result<SessionContext> {
        let mut builder = self.options.cluster_context_builder(key)?;
        for file in &self.udf_files {
            builder = builder.with_python_udfs_from_file(file)?;
        }
        let ctx = builder.build()?;
        for (name, path) in &self.tables {
            register_table(&ctx, name, path).await?;
        }
        Ok(ctx)
    }
}

pub async fn register_table(
    ctx: &SessionContext,
    name: &str,
    path: &std::path::Path,
) -> Result<()> {
    let location = path.to_str().ok_or_else(|| {
        DataFusionError::Configuration(format!("table path {} is not UTF-8", path.display()))
    })?;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_csv {
        ctx.register_csv(name, location, CsvReadOptions::new())
            .await
    } else {
        ctx.register_parquet(name, location, ParquetReadOptions::default())
            .await
    }
}

/// A digest of a result as printed (FNV-1a of the table's text), to compare runs.
fn digest(batches: &[datafusion::arrow::record_batch::RecordBatch]) -> Result<String> {
    let text = pretty_format_batches(batches)?.to_string();
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3)
    });
    Ok(format!("{hash:016x}"))
}

pub async fn sql(args: SqlArgs, key: Option<ClusterKey>) -> Result<()> {
    let ctx = args.cluster.context(key).await?;
    let began = Instant::now();
    let more = |run: u32| {
        run < args.repeat || args.repeat_for.is_some_and(|limit| began.elapsed() < limit)
    };
    let mut run = 1;
    while more(run) {
        let started = Instant::now();
        let batches = dfship_distributed::collect(ctx.sql(&args.query).await?).await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        eprintln!(
            "dfship-timing run={run} seconds={:.6} rows={rows} result={}",
            started.elapsed().as_secs_f64(),
            digest(&batches)?
        );
        run += 1;
    }
    let started = Instant::now();
    let df = ctx.sql(&args.query).await?;
    match &args.output {
        Some(path) => {
            let location = path.to_string_lossy().to_string();
            let is_csv = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
            let options = DataFrameWriteOptions::new().with_single_file_output(true);
            if is_csv {
                df.write_csv(&location, options, None).await?;
            } else {
                df.write_parquet(&location, options, None).await?;
            }
            eprintln!("wrote {} in {:.2?}", path.display(), started.elapsed());
        }
        None => {
            let bar = ProgressView::on_terminal();
            // UDF output on stderr, above the bar when there is one.
            let output: dfship_distributed::OutputCallback = match &bar {
                Some(view) => {
                    let bar = view.0.clone();
                    std::sync::Arc::new(move |line: &dfship_distributed::UdfOutput| {
                        bar.suspend(|| eprintln!("{line}"))
                    })
                }
                None => dfship_distributed::print_output_to_stderr(),
            };
            let options = dfship_distributed::CollectOptions {
                progress: bar.as_ref().map(|b| b.callback()),
                output: Some(output),
                timeout: None,
            };
            let batches = dfship_distributed::collect_with(df, options).await;
            drop(bar);
            let batches = batches?;
            println!("{}", pretty_format_batches(&batches)?);
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            if run > 1 {
                eprintln!(
                    "dfship-timing run={run} seconds={:.6} rows={rows} result={}",
                    started.elapsed().as_secs_f64(),
                    digest(&batches)?
                );
                if let Some(retry) = dfship_distributed::QueryRetry::of(&ctx.state()) {
                    let stats = retry.stats();
                    eprintln!(
                        "dfship-retries queries={} retries={} exhausted={}",
                        stats.queries, stats.retries, stats.exhausted
                    );
                }
            }
            eprintln!("{rows} rows in {:.2?}", started.elapsed());
        }
    }
    Ok(())
}

/// A bar of the query's tasks on stderr, drawn only when stderr is a terminal.
struct ProgressView(indicatif::ProgressBar);

impl ProgressView {
    fn on_terminal() -> Option<Self> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} tasks {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(Self(bar))
    }

    fn callback(&self) -> dfship_distributed::ProgressCallback {
        let bar = self.0.clone();
        std::sync::Arc::new(move |progress: &dfship_distributed::QueryProgress| {
            let (done, total) = progress.tasks();
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            let stages: Vec<String> = progress
                .stages
                .iter()
                .map(|s| format!("s{}:{}+{}/{}", s.stage, s.done, s.running, s.tasks))
                .collect();
            bar.set_message(stages.join(" "));
        })
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

pub async fn explain(args: ExplainArgs, key: Option<ClusterKey>) -> Result<()> {
    let ctx = args.cluster.context(key).await?;
    if args.analyze {
        let df = ctx.sql(&args.query).await?;
        println!("{}", dfship_distributed::explain_analyze(df).await?);
        return Ok(());
    }
    let plan = ctx.sql(&args.query).await?.create_physical_plan().await?;
    println!("{}", dfship_distributed::explain_plan(&ctx, &plan));
    Ok(())
}
