//! The local routing proxy (issue 5). So far: the route matcher
//! (`matcher`), a pure function from the applied routes and a request head
//! to the route that takes it. The listeners, balancers and connection
//! pools that use it are not built yet.
//!
//! Depends on `registry` only; the proxy will read the node's applied
//! routes and instances and never write to Raft.

pub mod matcher;
