//! The openraft state-machine adapter: applies committed entries to the
//! `Registry`, persists the result in sled and builds/installs snapshots.
//!
//! Owns the `sm` tree (registry keys plus `meta/applied` and
//! `meta/membership`) and the `snapshot` tree (`meta`, `data`). Does not
//! interpret commands: `registry::Registry::apply` does, purely.
//!
//! Invariants:
//! - The applied pointer and the applied data change atomically, so after a
//!   crash the stored state is exactly the state at the stored index. Each
//!   apply writes one `AppliedRecord` (the new pointer *and* every key it
//!   changes) as the single value of `meta/applied`, then the keys
//!   themselves. sled makes a single-key write atomic and recovers a prefix
//!   of the writes, so a key change on disk implies its record is on disk;
//!   `open` replays the record (each change sets or removes a key, so a
//!   replay is idempotent). Why not a sled batch: sled 0.34 writes its IO
//!   buffer out twice for every batch, waiting for the disk each time, and
//!   that was on every apply of every node.
//! - Applies reach sled behind the answer: `apply` changes the in-memory
//!   registry and hands the record to the `sm-writer` thread, which writes
//!   records in apply order (merging whatever queued into one record, which
//!   replays the same). Why: encoding and writing the record was on the
//!   path of every write's answer, and the log already makes committed
//!   entries durable: after a crash the stored state is that of some
//!   earlier index, and openraft applies the log from there. The log is
//!   only purged behind a snapshot, which is synced before purging and
//!   restored at `open` when it is ahead of the stored state, so the
//!   entries needed to catch up are always there. A snapshot install first
//!   waits for the writer, so no older record lands on the installed state.
//! - The in-memory `Registry` behind `Shared::registry` is the state at
//!   `Shared::applied` (readers take the lock, then read both consistently).
//! - A snapshot is flushed to disk before openraft may purge the log behind
//!   it, and the applied state it was built from is flushed with it.
//!
//! Concurrency: openraft's state-machine task is the only writer. API readers
//! take the `std::sync::RwLock` for short, non-async critical sections; the
//! lock is never held across an await. `applied` is a `tokio::sync::watch`
//! so readers can wait for an index without polling.

// openraft's storage traits fix `StorageError` as the error type; helpers
// return it unboxed so `?` composes with the trait methods.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;

use super::log_store::Syncer;
use super::types::{
    any_err, Entry, LogId, PeerNode, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, TypeConfig,
};
use crate::registry::{NodeEntry, Registry, Response};
use crate::watch::Hub;

const META_PREFIX: &[u8] = b"meta/";
const APPLIED: &[u8] = b"meta/applied";
const MEMBERSHIP: &[u8] = b"meta/membership";
const SNAP_META: &[u8] = b"meta";

/// The value of `meta/applied`; see the module invariants.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct AppliedRecord {
    last_applied: Option<LogId>,
    /// Keys as stored and `Some(value)` to set or `None` to remove; both are
    /// UTF-8 (readable prefixes and ids, JSON values).
    changes: Vec<(String, Option<String>)>,
}

impl AppliedRecord {
    /// Folds a later record into this one: replaying the result equals
    /// replaying both in order.
    fn absorb(&mut self, later: AppliedRecord) {
        self.last_applied = later.last_applied;
        if later.changes.is_empty() {
            return;
        }
        let mut at: std::collections::HashMap<String, usize> = self
            .changes
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        for (k, v) in later.changes {
            match at.get(&k) {
                Some(&i) => self.changes[i].1 = v,
                None => {
                    at.insert(k.clone(), self.changes.len());
                    self.changes.push((k, v));
                }
            }
        }
    }

    /// Reads a stored record; data dirs from before records held the bare
    /// pointer.
    fn decode(v: &[u8]) -> Result<Self, StorageError> {
        serde_json::from_slice::<AppliedRecord>(v).or_else(|_| {
            serde_json::from_slice::<Option<LogId>>(v)
                .map(|last_applied| AppliedRecord {
                    last_applied,
                    changes: Vec::new(),
                })
                .map_err(sm_read_err)
        })
    }
}

fn utf8(bytes: Vec<u8>) -> Result<String, StorageError> {
    String::from_utf8(bytes).map_err(sm_write_err)
}

/// Writes a record's changes key by key.
fn write_changes(tree: &sled::Tree, changes: &[(String, Option<String>)]) -> sled::Result<()> {
    for (k, v) in changes {
        match v {
            Some(v) => {
                tree.insert(k.as_bytes(), v.as_bytes())?;
            }
            None => {
                tree.remove(k.as_bytes())?;
            }
        }
    }
    Ok(())
}
const SNAP_DATA: &[u8] = b"data";

/// State shared between the state machine (writer) and every reader on the
/// node: the API, and later the router and stream pipelines.
pub struct Shared {
    /// The applied registry; see the module invariants.
    registry: RwLock<Registry>,
    /// Last applied index, for waiting on read barriers and change feeds.
    applied: watch::Sender<u64>,
    /// Snapshots received from a leader and installed by this process.
    snapshots_installed: AtomicU64,
    /// The change feed blocking queries and watch streams sleep on; fed
    /// after each apply, once the registry shows the change.
    hub: Hub,
    /// Writes applied records to sled behind the answers.
    writer: Writer,
}

impl Shared {
    fn new(registry: Registry, writer: Writer) -> Self {
        let (applied, _) = watch::channel(registry.last_index());
        Shared {
            writer,
            hub: Hub::new(registry.last_index()),
            registry: RwLock::new(registry),
            applied,
            snapshots_installed: AtomicU64::new(0),
        }
    }

    /// Read access to the applied state. A poisoned lock means the state
    /// machine panicked mid-apply; readers still see the last complete value
    /// because apply swaps nothing in place before it has finished.
    pub fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    fn replace(&self, reg: Registry) {
        let index = reg.last_index();
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = reg;
        self.hub.reset(index);
        self.applied.send_replace(index);
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed.load(Ordering::Relaxed)
    }

    /// Waits until everything applied so far has been written to sled (not
    /// synced): shutdown calls it before the final flush.
    pub async fn flush_applied(&self) -> Result<(), StorageError> {
        self.writer.barrier().await
    }
}

/// Most records queued for the writer; `apply` waits for room beyond that.
const WRITER_QUEUE: usize = 64;
const WRITE_FAILED: &str = "an earlier state-machine write failed";

enum WriterMsg {
    Record(AppliedRecord),
    /// Answered once every record sent before it is written.
    Barrier(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// The sending side of the `sm-writer` thread; see the module invariants.
struct Writer {
    tx: tokio::sync::mpsc::Sender<WriterMsg>,
    /// Set by the thread when a write failed; later applies report it, which
    /// stops openraft as a failed apply always did.
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// Joined on drop, so the thread's handle on sled is gone with us.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing our sender ends the thread once it has written the queue.
        let (closed, _) = tokio::sync::mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    /// Starts the thread; it ends when the last sender is dropped.
    fn spawn(tree: sled::Tree) -> std::io::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(WRITER_QUEUE);
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("sm-writer".into())
            .spawn(move || write_loop(&tree, rx, &flag))?;
        Ok(Writer {
            tx,
            failed,
            thread: Some(thread),
        })
    }

    fn stopped() -> StorageError {
        sm_write_err(std::io::Error::other("state-machine writer stopped"))
    }

    async fn write(&self, record: AppliedRecord) -> Result<(), StorageError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(sm_write_err(std::io::Error::other(WRITE_FAILED)));
        }
        self.tx
            .send(WriterMsg::Record(record))
            .await
            .map_err(|_| Self::stopped())
    }

    async fn barrier(&self) -> Result<(), StorageError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(WriterMsg::Barrier(done))
            .await
            .map_err(|_| Self::stopped())?;
        rx.await
            .map_err(|_| Self::stopped())?
            .map_err(|e| sm_write_err(std::io::Error::other(e)))
    }
}

/// The `sm-writer` thread: takes whatever is queued, writes it as one
/// record (later changes of a key win) and then its keys.
fn write_loop(
    tree: &sled::Tree,
    mut rx: tokio::sync::mpsc::Receiver<WriterMsg>,
    failed: &std::sync::atomic::AtomicBool,
) {
    let mut msgs = Vec::new();
    while rx.blocking_recv_many(&mut msgs, WRITER_QUEUE) > 0 {
        let mut merged: Option<AppliedRecord> = None;
        let mut barriers = Vec::new();
        for msg in msgs.drain(..) {
            match msg {
                WriterMsg::Record(r) => match &mut merged {
                    None => merged = Some(r),
                    Some(m) => m.absorb(r),
                },
                WriterMsg::Barrier(b) => barriers.push(b),
            }
        }
        if let Some(record) = merged.filter(|_| !failed.load(Ordering::Acquire)) {
            if let Err(e) = write_record(tree, &record) {
                tracing::error!(error = %e, "writing applied state to sled failed");
                failed.store(true, Ordering::Release);
            }
        }
        let res = if failed.load(Ordering::Acquire) {
            Err(WRITE_FAILED.to_string())
        } else {
            Ok(())
        };
        for b in barriers {
            let _ = b.send(res.clone());
        }
    }
}

/// The record first, then its keys: see the module invariants.
fn write_record(tree: &sled::Tree, record: &AppliedRecord) -> Result<(), String> {
    let bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    tree.insert(APPLIED, bytes).map_err(|e| e.to_string())?;
    write_changes(tree, &record.changes).map_err(|e| e.to_string())
}

/// The sled-backed state machine openraft drives.
pub struct StateMachineStore {
    /// Makes snapshots and installed state durable before openraft relies on them.
    syncer: Syncer,
    sm: sled::Tree,
    snap: sled::Tree,
    shared: Arc<Shared>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Distinguishes snapshots built by this process at the same index.
    snapshot_seq: u64,
}

/// Builds a snapshot from the state encoded when openraft asked.
pub struct SnapshotBuilder {
    syncer: Syncer,
    snap: sled::Tree,
    /// The registry, encoded under the read lock: cheaper in memory than a
    /// clone of the registry, and consistent with `last_applied`.
    data: Result<Vec<u8>, String>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    seq: u64,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(any_err(&e)).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(any_err(&e)).into()
}

fn members_of(m: &StoredMembership) -> Vec<NodeEntry> {
    let voters: std::collections::BTreeSet<u64> = m.membership().voter_ids().collect();
    m.membership()
        .nodes()
        .map(|(id, n)| NodeEntry {
            id: *id,
            name: n.name.clone(),
            api_addr: n.api_addr.clone(),
            peer_addr: n.peer_addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(sm_write_err)
}

impl StateMachineStore {
    /// Opens the state machine persisted in `db`, restoring from the stored
    /// snapshot if it is ahead of the stored state.
    pub async fn open(db: &sled::Db, syncer: Syncer) -> Result<Self, StorageError> {
        let sm = db.open_tree("sm").map_err(sm_read_err)?;
        let snap = db.open_tree("snapshot").map_err(sm_read_err)?;
        let read_json = |k: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            Ok(sm.get(k).map_err(sm_read_err)?.map(|v| v.to_vec()))
        };
        let record = match read_json(APPLIED)? {
            Some(v) => AppliedRecord::decode(&v)?,
            None => AppliedRecord::default(),
        };
        // The keys of the last apply may not all have reached the disk.
        write_changes(&sm, &record.changes).map_err(sm_read_err)?;
        let last_applied = record.last_applied;
        let membership: StoredMembership = match read_json(MEMBERSHIP)? {
            Some(v) => serde_json::from_slice(&v).map_err(sm_read_err)?,
            None => StoredMembership::default(),
        };
        let mut entries = Vec::new();
        for kv in sm.iter() {
            let (k, v) = kv.map_err(sm_read_err)?;
            if !k.starts_with(META_PREFIX) {
                entries.push((k.to_vec(), v.to_vec()));
            }
        }
        let registry =
            Registry::load(entries, last_applied.map_or(0, |l| l.index)).map_err(sm_read_err)?;
        let writer = Writer::spawn(sm.clone()).map_err(sm_write_err)?;
        let mut store = StateMachineStore {
            syncer,
            sm,
            snap,
            shared: Arc::new(Shared::new(registry, writer)),
            last_applied,
            membership,
            snapshot_seq: 0,
        };
        if let Some(s) = store.get_current_snapshot().await? {
            if s.meta.last_log_id > store.last_applied {
                store.restore(&s.meta, s.snapshot.into_inner())?;
            }
        }
        Ok(store)
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Replaces the whole stored and in-memory state with a snapshot's.
    fn restore(&mut self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), StorageError> {
        let mut registry: Registry = serde_json::from_slice(&data).map_err(sm_read_err)?;
        registry.advance(meta.last_log_id.map_or(0, |l| l.index));
        let mut batch = sled::Batch::default();
        for k in self.sm.iter().keys() {
            batch.remove(k.map_err(sm_read_err)?);
        }
        for (k, v) in registry.encode_all() {
            batch.insert(k.encode(), v);
        }
        // One batch (rare: snapshot installs), so the record needs no changes.
        let record = AppliedRecord {
            last_applied: meta.last_log_id,
            changes: Vec::new(),
        };
        batch.insert(APPLIED, encode(&record)?);
        batch.insert(MEMBERSHIP, encode(&meta.last_membership)?);
        self.sm.apply_batch(batch).map_err(sm_write_err)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.replace(registry);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let data = std::mem::replace(&mut self.data, Ok(Vec::new()))
            .map_err(|e| sm_read_err(std::io::Error::other(e)))?;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let mut batch = sled::Batch::default();
        batch.insert(SNAP_META, encode(&meta)?);
        batch.insert(SNAP_DATA, data.clone());
        let wr = |e: sled::Error| -> StorageError {
            StorageIOError::write_snapshot(Some(meta.signature()), any_err(&e)).into()
        };
        self.snap.apply_batch(batch).map_err(wr)?;
        // The log behind this snapshot may be purged as soon as we return.
        self.syncer.sync_async().await.map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                any_err(&e),
            ))
        })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        let mut last_index = None;
        {
            let mut reg = self
                .shared
                .registry
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let mut touched = Vec::new();
            let mut membership_changed = false;
            for entry in entries {
                let index = entry.log_id.index;
                self.last_applied = Some(entry.log_id);
                last_index = Some(index);
                match entry.payload {
                    EntryPayload::Blank => {
                        reg.advance(index);
                        responses.push(Response::None);
                    }
                    EntryPayload::Normal(cmd) => {
                        let (resp, keys) = reg.apply(index, &cmd);
                        touched.extend(keys);
                        responses.push(resp);
                    }
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), m);
                        touched.extend(reg.set_members(index, members_of(&self.membership)));
                        membership_changed = true;
                        responses.push(Response::None);
                    }
                }
            }
            touched.sort();
            touched.dedup();
            for k in touched {
                let value = reg.encode_value(&k).map(utf8).transpose()?;
                changes.push((utf8(k.encode())?, value));
            }
            if membership_changed {
                changes.push((
                    utf8(MEMBERSHIP.to_vec())?,
                    Some(utf8(encode(&self.membership)?)?),
                ));
            }
        }
        if let Some(i) = last_index {
            // The writer and the hub each keep the changes: one copy.
            let record = AppliedRecord {
                last_applied: self.last_applied,
                changes: changes.clone(),
            };
            self.shared.writer.write(record).await?;
            self.shared.hub.publish(i, changes);
            self.shared.applied.send_replace(i);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            syncer: self.syncer.clone(),
            snap: self.snap.clone(),
            data: serde_json::to_vec(&*self.shared.read()).map_err(|e| e.to_string()),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // No record of an earlier apply may land on the installed state.
        self.shared.writer.barrier().await?;
        let mut batch = sled::Batch::default();
        batch.insert(SNAP_META, encode(meta)?);
        batch.insert(SNAP_DATA, data.clone());
        self.snap.apply_batch(batch).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                any_err(&e),
            ))
        })?;
        self.restore(meta, data)?;
        self.syncer.sync_async().await.map_err(sm_write_err)?;
        self.shared
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let meta = self.snap.get(SNAP_META).map_err(sm_read_err)?;
        let data = self.snap.get(SNAP_DATA).map_err(sm_read_err)?;
        match (meta, data) {
            (Some(m), Some(d)) => {
                let meta: SnapshotMeta = serde_json::from_slice(&m).map_err(sm_read_err)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(d.to_vec())),
                }))
            }
            _ => Ok(None),
        }
    }
}

/// Names for members as the registry sees them; used by status endpoints.
pub fn peer_of(n: &NodeEntry) -> PeerNode {
    PeerNode {
        name: n.name.clone(),
        api_addr: n.api_addr.clone(),
        peer_addr: n.peer_addr.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Command, ServiceSpec, StateKey};
    use openraft::CommittedLeaderId;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn register(id: &str) -> Command {
        Command::RegisterService {
            via_node: 1,
            service: ServiceSpec {
                id: id.into(),
                name: "web".into(),
                ..Default::default()
            },
        }
    }

    async fn open(dir: &std::path::Path) -> (sled::Db, StateMachineStore) {
        let sled_dir = dir.join("sled");
        let db = sled::Config::new()
            .path(&sled_dir)
            .open()
            .expect("open sled");
        let syncer = Syncer::new(&db, &sled_dir).expect("syncer");
        let sm = StateMachineStore::open(&db, syncer)
            .await
            .expect("open state machine");
        (db, sm)
    }

    #[tokio::test]
    async fn a_record_whose_keys_did_not_all_land_is_replayed_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (db, mut sm) = open(dir.path()).await;
            let entry = Entry {
                log_id: log_id(1),
                payload: EntryPayload::Normal(register("a")),
            };
            sm.apply([entry]).await.expect("apply 1");
            sm.shared().flush_applied().await.expect("apply 1 written");
            // A crash after apply 2 wrote its record but before its key landed:
            // write exactly that by hand.
            let mut reg = Registry::new();
            reg.apply(1, &register("a"));
            reg.apply(2, &register("b"));
            let key = StateKey::Service("b".into());
            let value = reg.encode_value(&key).expect("b encodes");
            let record = AppliedRecord {
                last_applied: Some(log_id(2)),
                changes: vec![(
                    String::from_utf8(key.encode()).expect("utf8"),
                    Some(String::from_utf8(value).expect("utf8")),
                )],
            };
            let tree = db.open_tree("sm").expect("sm tree");
            tree.insert(APPLIED, serde_json::to_vec(&record).expect("encode"))
                .expect("write record");
            assert!(tree.get(key.encode()).expect("read").is_none());
            db.flush().expect("flush");
        }
        let (_db, mut sm) = open(dir.path()).await;
        let (applied, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(applied, Some(log_id(2)));
        let shared = sm.shared();
        let reg = shared.read();
        assert!(reg.service("a").is_some(), "apply 1 kept");
        let b = reg.service("b").expect("apply 2 replayed from its record");
        assert_eq!(b.modify_index, 2);
    }

    #[test]
    fn merged_records_replay_like_the_records_in_order() {
        let rec = |i, changes: &[(&str, Option<&str>)]| AppliedRecord {
            last_applied: Some(log_id(i)),
            changes: changes
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
        };
        let mut m = rec(1, &[("a", Some("1")), ("b", Some("1"))]);
        m.absorb(rec(2, &[("b", None), ("c", Some("2"))]));
        m.absorb(rec(3, &[]));
        m.absorb(rec(4, &[("c", Some("4")), ("b", Some("4"))]));
        assert_eq!(m.last_applied, Some(log_id(4)));
        let got: std::collections::BTreeMap<_, _> = m.changes.into_iter().collect();
        let want: std::collections::BTreeMap<_, _> = [
            ("a".to_string(), Some("1".to_string())),
            ("b".to_string(), Some("4".to_string())),
            ("c".to_string(), Some("4".to_string())),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn applies_reach_sled_behind_the_answer_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (_db, mut sm) = open(dir.path()).await;
            for i in 1..=50u64 {
                let entry = Entry {
                    log_id: log_id(i),
                    payload: EntryPayload::Normal(register(&format!("s{i}"))),
                };
                sm.apply([entry]).await.expect("apply");
            }
            sm.shared().flush_applied().await.expect("written");
        }
        let (_db, mut sm) = open(dir.path()).await;
        let (applied, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(applied, Some(log_id(50)));
        let shared = sm.shared();
        let reg = shared.read();
        for i in 1..=50u64 {
            assert!(reg.service(&format!("s{i}")).is_some(), "s{i} stored");
        }
    }

    #[test]
    fn reads_the_bare_pointer_of_older_data_dirs() {
        let old = serde_json::to_vec(&Some(log_id(7))).expect("encode");
        let r = AppliedRecord::decode(&old).expect("decodes");
        assert_eq!(r.last_applied, Some(log_id(7)));
        assert!(r.changes.is_empty());
        assert!(AppliedRecord::decode(b"{oops").is_err());
    }
}
