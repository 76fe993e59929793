//! Stream pipelines on every node: events in (`POST .../events`, the
//! `_registry` and `_traffic` sources), processors, bounded buffers,
//! delivery to clients and to registered services.
//!
//! Definitions are replicated (`registry::stream`); events are not: they
//! flow through the node that received them, in memory. `pipeline`
//! processes, `buffer` queues with a full-buffer policy, `delivery` POSTs
//! to a subscription's service instances, `runtime` runs it all.

pub mod buffer;
pub mod delivery;
pub mod expr;
pub mod pipeline;
pub mod runtime;
pub mod window;

pub use runtime::{ClientStream, IngestError, Ingested, Streams};
