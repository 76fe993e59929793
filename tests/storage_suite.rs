//! openraft's storage conformance suite against raftmesh's sled stores.
//!
//! Each suite case gets a fresh sled database in its own temp dir (the
//! builder's guard keeps the dir alive for the case). This exercises the
//! real `LogStore` and `StateMachineStore`, not test doubles.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use raftmesh::raft::log_store::{LogStore, Syncer};
use raftmesh::raft::state_machine::StateMachineStore;
use raftmesh::raft::types::{any_err, StorageError, StorageIOError, TypeConfig};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let io = |e: &dyn std::fmt::Display| -> StorageError {
            StorageIOError::write(any_err(&std::io::Error::other(e.to_string()))).into()
        };
        let dir = tempfile::tempdir().map_err(|e| io(&e))?;
        let sled_dir = dir.path().join("sled");
        let db = sled::Config::new()
            .path(&sled_dir)
            .open()
            .map_err(|e| io(&e))?;
        let syncer = Syncer::new(&db, &sled_dir).map_err(|e| io(&e))?;
        let log =
            LogStore::open(&db, syncer.clone(), Arc::new(AtomicU64::new(0))).map_err(|e| io(&e))?;
        let sm = StateMachineStore::open(&db, syncer).await?;
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() -> anyhow::Result<()> {
    Suite::test_all(SledBuilder)?;
    Ok(())
}
