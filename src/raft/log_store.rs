//! The Raft log, vote and committed/purged pointers in sled.
//!
//! Owns the `log` tree (key: big-endian index, value: JSON entry) and the
//! `raft_meta` tree (`vote`, `committed`, `last_purged`). Does not hold the
//! state machine (`state_machine.rs`) or snapshots.
//!
//! Durability invariants:
//! - `save_vote` returns only after sled has flushed the vote to disk.
//! - `append` reports an entry as persisted (`LogFlushed`) only after a sled
//!   flush that started after the entry was inserted.
//! - `purge` records `last_purged` before deleting entries, so a crash in
//!   between leaves extra entries, never a gap that the pointer hides.
//!
//! Concurrency: openraft drives one `LogStore` from its core task and clones
//! `LogReader`s for replication; sled trees are internally synchronized and
//! their handles are cheap clones. Flushing happens inline in `append`: while
//! one flush runs, openraft queues the next client writes and appends them as
//! one batch, so fsyncs are shared by every write that arrived meanwhile.

// openraft's storage traits fix `StorageError` as the error type; helpers
// return it unboxed so `?` composes with the trait methods.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogId, RaftLogReader};

use super::types::{
    any_err, Entry, LogId, LogState, StorageError, StorageIOError, TypeConfig, Vote,
};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Raft log storage over one sled database.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// Mirror of the last committed index openraft told us, for status pages.
    committed: Arc<AtomicU64>,
}

/// A read-only view of the log handed to replication tasks.
#[derive(Clone)]
pub struct LogReader {
    log: sled::Tree,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn map_bound(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(key(*i)),
        Bound::Excluded(i) => Bound::Excluded(key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn decode_entry(v: &[u8]) -> Result<Entry, StorageError> {
    serde_json::from_slice(v).map_err(|e| StorageIOError::read_logs(any_err(&e)).into())
}

fn read_entries<RB: RangeBounds<u64>>(
    log: &sled::Tree,
    range: RB,
) -> Result<Vec<Entry>, StorageError> {
    let r = (map_bound(range.start_bound()), map_bound(range.end_bound()));
    log.range(r)
        .map(|kv| {
            let (_, v) = kv.map_err(|e| StorageIOError::read_logs(any_err(&e)))?;
            decode_entry(&v)
        })
        .collect()
}

impl LogStore {
    /// Opens the log trees of `db`; `committed` is shared with the node's
    /// status reporting.
    pub fn open(db: &sled::Db, committed: Arc<AtomicU64>) -> Result<Self, sled::Error> {
        let store = LogStore {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("raft_meta")?,
            committed,
        };
        if let Ok(Some(c)) = store.read_meta::<LogId>(COMMITTED) {
            store.committed.store(c.index, Ordering::Relaxed);
        }
        Ok(store)
    }

    /// True when this data dir has ever held Raft state (a vote or an
    /// entry): such a node resumes and never bootstraps.
    pub fn has_state(db: &sled::Db) -> Result<bool, sled::Error> {
        let meta = db.open_tree("raft_meta")?;
        let log = db.open_tree("log")?;
        Ok(meta.get(VOTE)?.is_some() || !log.is_empty() || meta.get(LAST_PURGED)?.is_some())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self
            .meta
            .get(k)
            .map_err(|e| StorageIOError::read(any_err(&e)))?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StorageIOError::read(any_err(&e)).into()),
        }
    }

    fn write_meta<T: serde::Serialize>(
        &self,
        k: &[u8],
        v: &T,
        io: fn(openraft::AnyError) -> StorageIOError,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(v).map_err(|e| io(any_err(&e)))?;
        self.meta.insert(k, bytes).map_err(|e| io(any_err(&e)))?;
        Ok(())
    }

    async fn flush(
        &self,
        io: fn(openraft::AnyError) -> StorageIOError,
    ) -> Result<(), StorageError> {
        self.db.flush_async().await.map_err(|e| io(any_err(&e)))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.log, range)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.log, range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED)?;
        let last = match self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(any_err(&e)))?
        {
            Some((_, v)) => Some(*decode_entry(&v)?.get_log_id()),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            log: self.log.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote, StorageIOError::write_vote)?;
        self.flush(StorageIOError::write_vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: openraft recomputes commitment from a quorum after a
        // restart; the stored value only lets a node re-apply sooner.
        self.write_meta(COMMITTED, &committed, StorageIOError::write)?;
        self.committed
            .store(committed.map_or(0, |c| c.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes =
                serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
            batch.insert(&key(entry.get_log_id().index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
        let res = self
            .db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(std::io::Error::other);
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(key(log_id.index)..).keys() {
            batch.remove(k.map_err(|e| StorageIOError::write_logs(any_err(&e)))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
        self.flush(StorageIOError::write_logs).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.write_meta(LAST_PURGED, &log_id, StorageIOError::write_logs)?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=key(log_id.index)).keys() {
            batch.remove(k.map_err(|e| StorageIOError::write_logs(any_err(&e)))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
        Ok(())
    }
}
