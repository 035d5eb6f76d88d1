//! Splitting a file scan over a stage's tasks so every task gets the same
//! number of partitions.
//!
//! datafusion-distributed 4.0's built-in handler
//! (`events/defaults/file_scan_config.rs`) asks DataFusion's
//! `FileGroupPartitioner` for `partitions × tasks` file groups, then deals
//! them to tasks round-robin. The partitioner may return fewer groups than
//! asked (files too small to split, or `None` when it declines), so tasks can
//! end up with different partition counts, which `DistributedLeafExec`
//! rejects: "Different partition count where provided in two different
//! variants of DistributedLeafExec". It depends on file sizes, worker count
//! and `target_partitions`, so a query can work on one cluster and fail on
//! the next. This handler does the same split and then pads every task with
//! empty file groups up to the largest count; an empty group is a partition
//! that yields no rows. Registered as a custom handler, it runs before the
//! built-in one.

use std::sync::Arc;

use datafusion::datasource::physical_plan::{FileGroup, FileGroupPartitioner, FileScanConfig};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion_distributed::{
    DistributedLeafExec, ScaleUpLeafNodeEvent, ScaleUpLeafNodeEventResponse,
};

/// A `ScaleUpLeafNodeHandler` for Parquet/CSV/JSON file scans that gives
/// every task the same partition count (see the module docs).
pub fn even_file_scan_split(
    event: ScaleUpLeafNodeEvent,
) -> Option<Result<ScaleUpLeafNodeEventResponse>> {
    let source = event.plan.downcast_ref::<DataSourceExec>()?;
    let scan = source.data_source().downcast_ref::<FileScanConfig>()?;
    let tasks = event.task_count.max(1);
    let target = event.plan.output_partitioning().partition_count() * tasks;
    let mut groups = split_groups(scan, target);
    if groups.len() < tasks {
        groups = deal_files(groups, target);
    }

    let mut template = scan.clone();
    template.file_groups.clear();
    let mut per_task = vec![template; tasks];
    for (i, group) in groups.into_iter().enumerate() {
        per_task[i % tasks].file_groups.push(group);
    }
    let widest = per_task
        .iter()
        .map(|s| s.file_groups.len())
        .max()
        .unwrap_or(0)
        .max(1);
    for scan in &mut per_task {
        scan.file_groups
            .resize_with(widest, || FileGroup::new(Vec::new()));
    }
    let variants = per_task
        .into_iter()
        .map(|scan| DataSourceExec::from_data_source(scan) as Arc<dyn ExecutionPlan>);
    Some(
        DistributedLeafExec::try_new(Arc::clone(event.plan), variants)
            .map(|leaf| ScaleUpLeafNodeEventResponse::new(Arc::new(leaf))),
    )
}

/// When the partitioner declined (it does for scans that must keep their
/// order) and left fewer groups than tasks, so that some tasks would read
/// nothing: the same files, in the same order, in up to `target` groups of
/// consecutive files. A group's files stay in their order, so a declared
/// output ordering still holds within each group.
fn deal_files(groups: Vec<FileGroup>, target: usize) -> Vec<FileGroup> {
    let files: Vec<_> = groups.iter().flat_map(|g| g.iter().cloned()).collect();
    let count = target.min(files.len());
    if count <= groups.len() {
        return groups;
    }
    (0..count)
        .map(|i| {
            let (start, end) = (i * files.len() / count, (i + 1) * files.len() / count);
            FileGroup::new(files[start..end].to_vec())
        })
        .collect()
}

/// Upstream's split: round-robin when the scan declares its partitioning
/// (keeps partition values together), else DataFusion's size-based partitioner.
fn split_groups(scan: &FileScanConfig, target: usize) -> Vec<FileGroup> {
    if scan.output_partitioning.is_some() {
        let files: Vec<_> = scan
            .file_groups
            .iter()
            .flat_map(|g| g.iter().cloned())
            .collect();
        let mut groups = vec![Vec::new(); target.max(1)];
        for (i, file) in files.into_iter().enumerate() {
            groups[i % target.max(1)].push(file);
        }
        return groups.into_iter().map(FileGroup::new).collect();
    }
    FileGroupPartitioner::new()
        .with_target_partitions(target)
        .with_repartition_file_min_size(0)
        .with_preserve_order_within_groups(!scan.output_ordering.is_empty())
        .repartition_file_groups(&scan.file_groups)
        .unwrap_or_else(|| scan.file_groups.clone())
}
