//! The Raft log, vote and committed/purged pointers in sled.
//!
//! Owns the `log` tree (key: big-endian index, value: JSON entry), the
//! `raft_meta` tree (`vote`, `committed`, `last_purged`) and the log flusher
//! thread. Does not hold the state machine (`state_machine.rs`) or snapshots.
//!
//! Durability invariants:
//! - "Synced" means sled flushed its buffers *and* the database file was
//!   fdatasync'ed: sled 0.34 flushes with `sync_file_range`, which neither
//!   empties the disk's write cache nor persists file growth, so we add the
//!   fdatasync ourselves.
//! - `save_vote` and `truncate` return only after a sync.
//! - `append` reports entries as persisted (`LogFlushed`) only after a sync
//!   that started after they were inserted.
//! - `purge` records `last_purged` before deleting entries, so a crash in
//!   between leaves extra entries, never a gap that the pointer hides.
//!
//! Concurrency: openraft drives one `LogStore` from its core task and clones
//! `LogReader`s for replication; sled trees are internally synchronized.
//! `append` inserts and hands its callback to the flusher thread (group
//! commit): the thread takes every callback queued so far, syncs once and
//! completes them in order. The core keeps replicating while the leader's
//! own disk syncs, and one fsync serves every append that arrived meanwhile.
//! The thread ends when the last `LogStore` handle is dropped.
// openraft's storage traits fix `StorageError` as the error type; helpers
// return it unboxed so `?` composes with the trait methods.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::fs::File;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
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

/// Appends waiting for the flusher; bounds the queue between the core and
/// the disk.
const FLUSH_QUEUE: usize = 1024;

/// Makes sled's writes durable: flush, then fdatasync the database file.
#[derive(Clone)]
pub struct Syncer {
    db: sled::Db,
    /// sled's main file; fdatasync on any descriptor persists the inode.
    file: Arc<File>,
}

impl Syncer {
    /// `sled_dir` is the directory `db` was opened in.
    pub fn new(db: &sled::Db, sled_dir: &Path) -> std::io::Result<Self> {
        Ok(Syncer {
            db: db.clone(),
            file: Arc::new(File::open(sled_dir.join("db"))?),
        })
    }

    /// Blocking: flush sled, then fdatasync its file.
    pub fn sync(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.file.sync_data()
    }

    /// `sync` on tokio's blocking pool.
    pub async fn sync_async(&self) -> std::io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Group-commit loop run on the flusher thread.
    fn run(self, mut rx: tokio::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(cb) = rx.try_recv() {
                batch.push(cb);
            }
            let res = self.sync();
            for cb in batch {
                let r = match &res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                cb.log_io_completed(r);
            }
        }
    }
}

/// Raft log storage over one sled database.
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    syncer: Syncer,
    /// Appends whose callbacks wait for the next group sync.
    flusher: tokio::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
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
    /// Opens the log trees of `db` and starts the flusher thread, which
    /// syncs through `syncer`; `committed` is shared with status reporting.
    pub fn open(
        db: &sled::Db,
        syncer: Syncer,
        committed: Arc<AtomicU64>,
    ) -> Result<Self, std::io::Error> {
        let (flusher, rx) = tokio::sync::mpsc::channel(FLUSH_QUEUE);
        let thread_syncer = syncer.clone();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || thread_syncer.run(rx))?;
        let store = LogStore {
            log: db.open_tree("log").map_err(std::io::Error::other)?,
            meta: db.open_tree("raft_meta").map_err(std::io::Error::other)?,
            syncer,
            flusher,
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

    /// Syncs off the async threads; used where openraft needs durability
    /// before the call returns.
    async fn sync_now(
        &self,
        io: fn(openraft::AnyError) -> StorageIOError,
    ) -> Result<(), StorageError> {
        self.syncer
            .sync_async()
            .await
            .map_err(|e| io(any_err(&e)))?;
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
        self.sync_now(StorageIOError::write_vote).await
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
        // Durability is reported by the flusher thread once it has synced.
        self.flusher
            .send(callback)
            .await
            .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
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
        self.sync_now(StorageIOError::write_logs).await
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
