//! Stream pipelines on every node: events in (`POST .../events`, built-in
//! sources), processors, bounded buffers, delivery to subscribers.
//!
//! Definitions are replicated (`registry::stream`); events are not: they
//! flow through the node that received them.

pub mod buffer;
pub mod delivery;
pub mod pipeline;
