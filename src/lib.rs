//! raftmesh: a Raft-replicated coordination service — service registry,
//! health, membership and KV — with a Consul-compatible HTTP API.
//!
//! The crate is a library with a thin binary (`main.rs`). Module map and
//! dependency direction (`api → {health, raft} → registry`) follow DESIGN.md: the pure
//! state machine lives in `registry`, everything openraft-shaped in `raft`,
//! the HTTP surface in `api`, check timing and probing in `health`, and
//! `node` wires them together.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod health;
pub mod node;
pub mod proxy;
pub mod raft;
pub mod registry;
pub mod stream;
pub mod watch;
