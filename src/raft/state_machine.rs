//! The openraft state-machine adapter: applies committed entries to the
//! in-memory `Registry` and builds, stores and installs snapshots.
//!
//! Owns the `snapshot` tree (`meta`, `data`). Does not interpret commands:
//! `registry::Registry::apply` does, purely.
//!
//! Invariants:
//! - The applied state lives in memory; sled holds it as the latest
//!   snapshot plus the log behind it (as Consul keeps its FSM in memory
//!   beside raft-boltdb). `open` restores the stored snapshot and openraft
//!   re-applies the log from there up to the stored committed index, so
//!   after a restart or crash the state is that of every committed entry.
//!   Why not write each apply to sled as well: it doubled the sled work of
//!   every write on every node (the `sm-writer` thread and sled's IO
//!   threads took about a fifth of the machine under 64 writers), grew the
//!   data dir with every rewrite and held its pages in memory, and bought
//!   nothing the log did not already give.
//! - A snapshot is synced to disk before openraft may purge the log behind
//!   it (`build_snapshot` returns only then), so the entries a restart
//!   replays are always in the log. An installed snapshot is stored and
//!   synced before the install returns.
//! - The in-memory `Registry` behind `Shared::registry` is the state at
//!   `Shared::applied` (readers take the lock, then read both consistently).
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

/// Storage keys and JSON values as the watch hub keeps them; both are
/// UTF-8 by construction (readable prefixes and ids, JSON).
fn utf8(bytes: Vec<u8>) -> Result<String, StorageError> {
    String::from_utf8(bytes).map_err(sm_write_err)
}

const SNAP_META: &[u8] = b"meta";
const SNAP_DATA: &[u8] = b"data";
/// The tree older versions kept the applied state in; dropped at `open`.
const LEGACY_SM_TREE: &[u8] = b"sm";

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
}

impl Shared {
    fn new(registry: Registry) -> Self {
        let (applied, _) = watch::channel(registry.last_index());
        Shared {
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
}

/// The sled-backed state machine openraft drives.
pub struct StateMachineStore {
    /// Makes snapshots and installed state durable before openraft relies on them.
    syncer: Syncer,
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
    /// Opens the state machine persisted in `db`: the stored snapshot's
    /// state, or empty; openraft re-applies the log behind it.
    pub async fn open(db: &sled::Db, syncer: Syncer) -> Result<Self, StorageError> {
        // Applied state is no longer kept beside the snapshot; the snapshot
        // and the log behind it hold everything an older data dir's tree did.
        db.drop_tree(LEGACY_SM_TREE).map_err(sm_write_err)?;
        let snap = db.open_tree("snapshot").map_err(sm_read_err)?;
        let mut store = StateMachineStore {
            syncer,
            snap,
            shared: Arc::new(Shared::new(Registry::new())),
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot_seq: 0,
        };
        if let Some(s) = store.get_current_snapshot().await? {
            let (registry, _) = decode(s.snapshot.into_inner()).await?;
            store.restore(&s.meta, registry);
        }
        Ok(store)
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Replaces the in-memory state with a snapshot's.
    fn restore(&mut self, meta: &SnapshotMeta, mut registry: Registry) {
        registry.advance(meta.last_log_id.map_or(0, |l| l.index));
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.replace(registry);
    }
}

/// A snapshot's registry, decoded off the async workers (a large one takes
/// tens of milliseconds, and with one worker that would hold up heartbeats),
/// handed back with the bytes it came from.
async fn decode(data: Vec<u8>) -> Result<(Registry, Vec<u8>), StorageError> {
    tokio::task::spawn_blocking(move || {
        serde_json::from_slice::<Registry>(&data).map(|registry| (registry, data))
    })
    .await
    .map_err(sm_read_err)?
    .map_err(sm_read_err)
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
        }
        if let Some(i) = last_index {
            self.shared.hub.publish(i, changes);
            self.shared.applied.send_replace(i);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        // Encoded off the async workers: a large registry takes tens of
        // milliseconds, and with one worker that would hold up heartbeats.
        // Nothing is applied meanwhile (openraft's state machine worker
        // awaits this), so the encoding is exactly `last_applied`.
        let shared = self.shared.clone();
        let data = tokio::task::spawn_blocking(move || {
            serde_json::to_vec(&*shared.read()).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        SnapshotBuilder {
            syncer: self.syncer.clone(),
            snap: self.snap.clone(),
            data,
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
        // Decoded before it is stored: a snapshot that cannot be read is
        // refused, not kept as the one a restart would load.
        let (registry, data) = decode(snapshot.into_inner()).await?;
        let mut batch = sled::Batch::default();
        batch.insert(SNAP_META, encode(meta)?);
        batch.insert(SNAP_DATA, data);
        self.snap.apply_batch(batch).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                any_err(&e),
            ))
        })?;
        self.restore(meta, registry);
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
    use crate::registry::{Command, ServiceSpec};
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

    fn entry(i: u64) -> Entry {
        Entry {
            log_id: log_id(i),
            payload: EntryPayload::Normal(register(&format!("s{i}"))),
        }
    }

    #[tokio::test]
    async fn a_restart_resumes_from_the_last_snapshot_and_replays_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (_db, mut sm) = open(dir.path()).await;
            sm.apply((1..=50).map(entry)).await.expect("apply 1..50");
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("snapshot");
            assert_eq!(snap.meta.last_log_id, Some(log_id(50)));
            sm.apply((51..=60).map(entry)).await.expect("apply 51..60");
            assert!(sm.shared().read().service("s60").is_some());
        }
        let (_db, mut sm) = open(dir.path()).await;
        let (applied, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(
            applied,
            Some(log_id(50)),
            "openraft re-applies the log from the snapshot on"
        );
        {
            let shared = sm.shared();
            let reg = shared.read();
            assert_eq!(reg.last_index(), 50);
            for i in 1..=50u64 {
                assert!(reg.service(&format!("s{i}")).is_some(), "s{i} restored");
            }
            assert!(reg.service("s51").is_none(), "past the snapshot: the log's");
        }
        // The replay openraft does from the log lands on the restored state.
        sm.apply((51..=60).map(entry)).await.expect("replay 51..60");
        let shared = sm.shared();
        let reg = shared.read();
        assert_eq!(reg.services().count(), 60);
        assert_eq!(shared.applied_index(), 60);
    }

    #[tokio::test]
    async fn an_installed_snapshot_survives_a_restart() {
        let src_dir = tempfile::tempdir().expect("temp dir");
        let (_src_db, mut src) = open(src_dir.path()).await;
        src.apply((1..=20).map(entry)).await.expect("apply");
        let snap = src
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (_db, mut sm) = open(dir.path()).await;
            sm.apply((1..=3).map(|i| Entry {
                log_id: log_id(i),
                payload: EntryPayload::Normal(register(&format!("old{i}"))),
            }))
            .await
            .expect("apply");
            sm.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .expect("install");
            assert!(sm.shared().read().service("old1").is_none(), "replaced");
        }
        let (_db, mut sm) = open(dir.path()).await;
        let (applied, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(applied, Some(log_id(20)));
        let shared = sm.shared();
        let reg = shared.read();
        assert_eq!(reg.services().count(), 20);
        assert!(reg.service("old1").is_none());
    }

    #[tokio::test]
    async fn an_older_data_dirs_applied_state_tree_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (db, _sm) = open(dir.path()).await;
            let legacy = db.open_tree(LEGACY_SM_TREE).expect("tree");
            legacy.insert(b"svc/x", b"{}".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        let (db, _sm) = open(dir.path()).await;
        assert!(
            !db.tree_names().iter().any(|n| n.as_ref() == LEGACY_SM_TREE),
            "the old tree is gone"
        );
    }
}
