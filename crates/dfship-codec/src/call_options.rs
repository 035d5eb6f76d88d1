//! [`CallOptions`]: how a Python UDF wants to be called. They travel with
//! the UDF (in its frame, outside the pickle), so every worker honours them.

use std::num::{NonZeroU16, NonZeroU32};

/// How the engine calls a Python UDF.
///
/// ```
/// use std::num::{NonZeroU16, NonZeroU32};
/// use dfship_codec::CallOptions;
///
/// let options = CallOptions::default()
///     .with_batch_size(NonZeroU32::new(64))
///     .with_concurrency(NonZeroU16::new(1));
/// assert_eq!(options.batch_size.map(|n| n.get()), Some(64));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CallOptions {
    /// Every call sees at most this many rows: the engine slices its batches
    /// (zero-copy) and, for an async UDF, runs the slices concurrently.
    pub batch_size: Option<NonZeroU32>,
    /// At most this many runners of a worker hold the UDF (its instance, its
    /// objects); its calls queue for them and other runners never load it.
    pub concurrency: Option<NonZeroU16>,
    /// An async UDF's calls in flight on one runner at most
    /// (default [`dfship_runtime::DEFAULT_MAX_IN_FLIGHT`]).
    pub max_in_flight: Option<NonZeroU16>,
    /// The environment the UDF runs in (the SHA-256 that names it, see
    /// `local_modules.py`): a worker's runners serve the UDFs of one
    /// environment only. `None`: the worker's own environment.
    pub environment: Option<[u8; 32]>,
}

impl CallOptions {
    pub fn with_batch_size(mut self, rows: Option<NonZeroU32>) -> Self {
        self.batch_size = rows;
        self
    }

    pub fn with_concurrency(mut self, runners: Option<NonZeroU16>) -> Self {
        self.concurrency = runners;
        self
    }

    pub fn with_max_in_flight(mut self, calls: Option<NonZeroU16>) -> Self {
        self.max_in_flight = calls;
        self
    }

    pub fn with_environment(mut self, environment: Option<[u8; 32]>) -> Self {
        self.environment = environment;
        self
    }

    /// `batch_size u32 | concurrency u16 | max_in_flight u16`, 0 for unset
    /// (the environment travels beside them, see `wire::inline`).
    pub(crate) fn to_wire(self) -> [u8; 8] {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&self.batch_size.map_or(0, NonZeroU32::get).to_le_bytes());
        bytes[4..6].copy_from_slice(&self.concurrency.map_or(0, NonZeroU16::get).to_le_bytes());
        bytes[6..].copy_from_slice(&self.max_in_flight.map_or(0, NonZeroU16::get).to_le_bytes());
        bytes
    }

    pub(crate) fn from_wire(bytes: [u8; 8]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            batch_size: NonZeroU32::new(u32::from_le_bytes([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ])),
            concurrency: NonZeroU16::new(u16_at(4)),
            max_in_flight: NonZeroU16::new(u16_at(6)),
            environment: None,
        }
    }

    /// `batch 64, concurrency 1` — for `explain`; empty when nothing is set.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(rows) = self.batch_size {
            parts.push(format!("batch_size {rows}"));
        }
        if let Some(runners) = self.concurrency {
            parts.push(format!("concurrency {runners}"));
        }
        if let Some(calls) = self.max_in_flight {
            parts.push(format!("max_in_flight {calls}"));
        }
        if let Some(environment) = &self.environment {
            parts.push(format!(
                "environment {}",
                crate::pickled::short_hex(environment)
            ));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_through_their_wire_form() {
        let none = CallOptions::default();
        assert_eq!(CallOptions::from_wire(none.to_wire()), none);
        let all = CallOptions::default()
            .with_batch_size(NonZeroU32::new(100_000))
            .with_concurrency(NonZeroU16::new(3))
            .with_max_in_flight(NonZeroU16::new(64));
        assert_eq!(CallOptions::from_wire(all.to_wire()), all);
        assert_eq!(
            all.describe(),
            "batch_size 100000, concurrency 3, max_in_flight 64"
        );
    }
}
