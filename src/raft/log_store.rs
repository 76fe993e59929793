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
//! - Appends, truncation and purge write key by key, never in a sled batch
//!   (each batch makes sled 0.34 write its buffer out twice, waiting for the
//!   disk each time). Order keeps the log contiguous through a crash:
//!   appends and purges go oldest first, truncation newest first.
//!
//! Concurrency: openraft drives one `LogStore` from its core task and clones
//! `LogReader`s for replication; sled trees are internally synchronized.
//! `append` inserts and hands its callback to the flusher thread (group
//! commit): the thread takes every callback queued so far, syncs once and
//! completes them in order, so one fsync serves every append that arrived
//! meanwhile. openraft 0.9's core waits for that callback before it hands
//! the new entries to its replication streams; so that a leader's sync
//! and its followers' run side by side, `append` on a leader (its saved
//! vote is its own, committed) also posts the entries to the followers at
//! once through the `Speculator` (`speculate.rs`), reusing the JSON it just
//! encoded for sled. The thread ends when the last `LogStore` handle is
//! dropped.
//!
//! Tail cache: the newest entries (up to `TAIL_BYTES` of encoded size) are
//! also kept in memory, shared with the readers. Right after an append,
//! openraft reads the entries back to replicate and to apply them; serving
//! those reads from memory saves a JSON decode per read and, above all,
//! keeps sled from reading pages back from disk: sled's cache is split in
//! 256 shards, so a page larger than 1/256 of it (a leaf of batched
//! entries) is evicted at once, and every read of such a page first forces
//! sled's write buffer out with its own write and sync. Invariant: the
//! tail holds consecutive indexes ending at the last appended entry (or is
//! empty), and agrees with the `log` tree: appends go to sled first, then
//! the tail; truncation and purge trim the tail first, then sled.
// openraft's storage traits fix `StorageError` as the error type; helpers
// return it unboxed so `?` composes with the trait methods.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::fs::File;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogId, RaftLogReader};

use super::speculate::{self, Speculator};
use super::types::{
    any_err, Entry, LogId, LogState, StorageError, StorageIOError, TypeConfig, Vote,
};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Appends waiting for the flusher; bounds the queue between the core and
/// the disk.
const FLUSH_QUEUE: usize = 1024;

/// Encoded size of the newest entries kept in memory (see the module doc).
const TAIL_BYTES: usize = 256 * 1024;

/// The newest entries, oldest first, with their encoded sizes.
#[derive(Default)]
struct Tail {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.get_log_id().index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.get_log_id().index)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        let index = entry.get_log_id().index;
        if self.last_index().is_some_and(|last| last + 1 != index) {
            // Not contiguous (cannot happen after a proper truncate): start over.
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > TAIL_BYTES && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops entries at `index` and after.
    fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries up to and including `index`.
    fn purge_upto(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    /// The entries of `[start, end)`, if the tail holds every one of them.
    /// Unbounded ranges go to sled, which may briefly hold newer entries
    /// than the tail (appends reach sled first).
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let end = end?;
        if start >= end {
            return Some(Vec::new());
        }
        let (first, last) = (self.first_index()?, self.last_index()?);
        if start < first || end > last + 1 {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

type SharedTail = Arc<Mutex<Tail>>;

fn lock(tail: &SharedTail) -> std::sync::MutexGuard<'_, Tail> {
    tail.lock().unwrap_or_else(|p| p.into_inner())
}

/// `[start, end)` of a range of indexes; `end` None means unbounded.
fn index_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => Some(i.saturating_add(1)),
        Bound::Excluded(i) => Some(*i),
        Bound::Unbounded => None,
    };
    (start, end)
}

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
    tail: SharedTail,
    /// The vote as last saved, and the last committed log id openraft told
    /// us: what an early AppendEntries carries.
    vote: Option<Vote>,
    leader_commit: Option<LogId>,
    /// Sends what a leader appends to its followers at once (`speculate`).
    speculator: Option<Arc<Speculator>>,
}

/// A read-only view of the log handed to replication tasks.
#[derive(Clone)]
pub struct LogReader {
    log: sled::Tree,
    tail: SharedTail,
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
    tail: &SharedTail,
    range: RB,
) -> Result<Vec<Entry>, StorageError> {
    let (start, end) = index_bounds(&range);
    if let Some(hit) = lock(tail).get(start, end) {
        return Ok(hit);
    }
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
        let mut store = LogStore {
            log: db.open_tree("log").map_err(std::io::Error::other)?,
            meta: db.open_tree("raft_meta").map_err(std::io::Error::other)?,
            syncer,
            flusher,
            committed,
            tail: SharedTail::default(),
            vote: None,
            leader_commit: None,
            speculator: None,
        };
        if let Ok(Some(c)) = store.read_meta::<LogId>(COMMITTED) {
            store.committed.store(c.index, Ordering::Relaxed);
            store.leader_commit = Some(c);
        }
        store.vote = store.read_meta::<Vote>(VOTE).ok().flatten();
        Ok(store)
    }

    /// Makes this store send what it appends while this node leads to the
    /// other members at once, through `speculator`.
    ///
    /// Such a store must not let its node resume leadership in the same
    /// term after a restart. openraft 0.9 does resume a node whose saved
    /// vote is a committed vote for itself; but entries it posted before its
    /// own sync may be missing from its log after a crash, and it would then
    /// give their log ids to other entries while followers keep the ones
    /// they synced (they match log ids, not contents). So such a vote is
    /// saved again uncommitted, before openraft starts: still a vote for
    /// itself in that term (it grants nobody else that term's vote it would
    /// not have granted anyway), but not one openraft resumes. openraft's
    /// elections always move to a new term, so the node never leads in its
    /// old term again. Why not a vote in the next term: votes order by
    /// (term, node id), so it would outrank a lower-id node the others
    /// elected in that term and unseat it.
    pub async fn with_speculator(
        mut self,
        speculator: Arc<Speculator>,
    ) -> Result<Self, StorageError> {
        let me = speculator.id();
        if let Some(v) = self.vote {
            if v.is_committed() && v.leader_id().voted_for() == Some(me) {
                let kept = Vote::new(v.leader_id().get_term(), me);
                tracing::info!(
                    was = %v,
                    now = %kept,
                    "led before the restart: will not resume leadership in this term"
                );
                self.save_vote(&kept).await?;
            }
        }
        self.speculator = Some(speculator);
        Ok(self)
    }

    /// The speculator, if this node leads in the saved vote (a committed
    /// vote for itself): only a leader's appends are its own to send.
    fn leading_speculator(&self) -> Option<(&Arc<Speculator>, &Vote)> {
        let spec = self.speculator.as_ref()?;
        let vote = self.vote.as_ref()?;
        (vote.is_committed() && vote.leader_id().voted_for() == Some(spec.id()))
            .then_some((spec, vote))
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
        read_entries(&self.log, &self.tail, range)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.log, &self.tail, range)
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
            tail: self.tail.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote, StorageIOError::write_vote)?;
        self.sync_now(StorageIOError::write_vote).await?;
        self.vote = Some(*vote);
        Ok(())
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
        self.leader_commit = committed;
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
        // Plain inserts, in index order, not a sled batch: sled 0.34 writes
        // out its IO buffer twice for every batch (around the batch
        // manifest), each time waiting for the disk. Entries need no
        // atomicity: a crash keeps a prefix of them (sled persists in log
        // order), and none of them was acknowledged before the sync.
        let leading = self.leading_speculator();
        let mut appended = Vec::new();
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes =
                serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
            let size = bytes.len();
            if leading.is_some() {
                encoded.push(bytes.clone());
            }
            self.log
                .insert(key(entry.get_log_id().index), bytes)
                .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
            appended.push((entry, size));
        }
        let first = appended.first().map(|(e, _)| e.get_log_id().index);
        let last = appended.last().map(|(e, _)| *e.get_log_id());
        let prev = {
            let mut tail = lock(&self.tail);
            // The entry before the first appended one, if the tail holds it.
            let prev = tail
                .entries
                .back()
                .map(|(e, _)| *e.get_log_id())
                .filter(|p| Some(p.index + 1) == first);
            for (entry, size) in appended {
                tail.push(entry, size);
            }
            prev
        };
        if let (Some((spec, vote)), Some(last), Some(prev)) = (leading, last, prev) {
            match speculate::request_body(vote, &Some(prev), &self.leader_commit, &encoded) {
                Ok(body) => spec.send(
                    speculate::Key {
                        vote: *vote,
                        prev: Some(prev),
                        last,
                    },
                    body,
                ),
                Err(e) => tracing::warn!(error = %e, "early append not encoded"),
            }
        }
        // Durability is reported by the flusher thread once it has synced.
        self.flusher
            .send(callback)
            .await
            .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.tail).truncate_from(log_id.index);
        // Newest first, so a crash part-way leaves the log contiguous.
        for k in self.log.range(key(log_id.index)..).keys().rev() {
            let k = k.map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
            self.log
                .remove(k)
                .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
        }
        self.sync_now(StorageIOError::write_logs).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.write_meta(LAST_PURGED, &log_id, StorageIOError::write_logs)?;
        lock(&self.tail).purge_upto(log_id.index);
        // Oldest first, so a crash part-way leaves the log contiguous.
        for k in self.log.range(..=key(log_id.index)).keys() {
            let k = k.map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
            self.log
                .remove(k)
                .map_err(|e| StorageIOError::write_logs(any_err(&e)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: &[Entry]) -> Vec<u64> {
        v.iter().map(|e| e.get_log_id().index).collect()
    }

    #[tokio::test]
    async fn a_leader_that_posts_early_does_not_resume_its_term() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let sled_dir = dir.path().join("sled");
        let db = sled::Config::new().path(&sled_dir).open()?;
        let syncer = Syncer::new(&db, &sled_dir)?;
        let open = || LogStore::open(&db, syncer.clone(), Arc::new(AtomicU64::new(0)));
        let client = crate::raft::network::PeerClient::new("127.0.0.1".parse()?)?;
        let spec = |id| {
            Arc::new(Speculator::new(
                id,
                client.clone(),
                std::time::Duration::from_millis(50),
            ))
        };
        open()?.save_vote(&Vote::new_committed(3, 1)).await?;

        // Without early appends openraft may resume the same term.
        assert_eq!(open()?.read_vote().await?, Some(Vote::new_committed(3, 1)));
        // Another node's store keeps the leader's vote as it is.
        let mut other = open()?.with_speculator(spec(2)).await?;
        assert_eq!(other.read_vote().await?, Some(Vote::new_committed(3, 1)));
        // The leader's own store keeps its vote for itself in that term,
        // not committed (openraft resumes only a committed one), through
        // another open too.
        let mut me = open()?.with_speculator(spec(1)).await?;
        let want = Vote::new(3, 1);
        assert_eq!(me.read_vote().await?, Some(want));
        assert!(
            me.leading_speculator().is_none(),
            "not leading until elected"
        );
        assert_eq!(open()?.read_vote().await?, Some(want));
        Ok(())
    }

    #[test]
    fn tail_serves_only_ranges_it_holds_whole() {
        let mut t = Tail::default();
        for i in 5..=9 {
            t.push(entry(i), 10);
        }
        assert_eq!(
            t.get(5, Some(10)).map(|v| indexes(&v)),
            Some(vec![5, 6, 7, 8, 9])
        );
        assert_eq!(t.get(7, Some(9)).map(|v| indexes(&v)), Some(vec![7, 8]));
        assert_eq!(t.get(9, Some(9)).map(|v| indexes(&v)), Some(vec![]));
        assert!(t.get(4, Some(8)).is_none(), "starts before the tail");
        assert!(t.get(8, Some(11)).is_none(), "ends past the tail");
        assert!(t.get(6, None).is_none(), "unbounded goes to sled");
    }

    #[test]
    fn tail_evicts_oldest_by_size_and_keeps_the_newest() {
        let mut t = Tail::default();
        let big = TAIL_BYTES / 2 + 1;
        t.push(entry(1), big);
        t.push(entry(2), big);
        assert_eq!(t.first_index(), Some(2));
        assert_eq!(t.bytes, big);
        // A single entry over the cap is still kept: it is the newest.
        t.push(entry(3), TAIL_BYTES * 2);
        assert_eq!((t.first_index(), t.last_index()), (Some(3), Some(3)));
    }

    #[test]
    fn tail_truncate_purge_and_gaps() {
        let mut t = Tail::default();
        for i in 1..=6 {
            t.push(entry(i), 1);
        }
        t.truncate_from(5);
        assert_eq!(
            (t.first_index(), t.last_index(), t.bytes),
            (Some(1), Some(4), 4)
        );
        t.purge_upto(2);
        assert_eq!(
            (t.first_index(), t.last_index(), t.bytes),
            (Some(3), Some(4), 2)
        );
        t.push(entry(5), 1);
        assert_eq!(t.last_index(), Some(5));
        // A gap means the tail no longer mirrors the log's end: it restarts.
        t.push(entry(9), 1);
        assert_eq!(
            (t.first_index(), t.last_index(), t.bytes),
            (Some(9), Some(9), 1)
        );
    }
}
