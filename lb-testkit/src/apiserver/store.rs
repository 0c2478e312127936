//! The double's storage: the current objects of each kind, one global
//! resourceVersion counter, a bounded event history per kind (what a watch
//! replays), list snapshots for `continue` tokens, and request counters.
//!
//! It lives apart from the HTTP server so that it survives a server restart.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::sync::watch;

use super::selector::{FieldSelector, LabelSelector};

/// Events kept per kind for watches that resume from a resourceVersion.
pub const DEFAULT_HISTORY_LIMIT: usize = 1000;
/// List snapshots kept for `continue` tokens; older tokens get 410 Expired.
const SNAPSHOT_LIMIT: usize = 16;

/// The kinds the double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` `Service` (namespaced, `/api/v1/.../services`).
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice` (namespaced).
    EndpointSlice,
    /// `v1` `Node` (cluster-scoped, `/api/v1/nodes`).
    Node,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// `apiVersion` of the kind's objects (`v1`, `discovery.k8s.io/v1`).
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// `kind` of the kind's objects (`Service`).
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The resource name in URL paths (`services`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    /// Whether objects of the kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// The kind with this `apiVersion` and `kind`, if the double serves it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A k8s-openapi type the double serves; lets [`Store::apply`] and friends
/// take and return typed objects.
pub trait Served: k8s_openapi::Resource + Serialize + DeserializeOwned {
    /// The double's kind for this type.
    const SERVED: Kind;
}

impl Served for Service {
    const SERVED: Kind = Kind::Service;
}
impl Served for EndpointSlice {
    const SERVED: Kind = Kind::EndpointSlice;
}
impl Served for Node {
    const SERVED: Kind = Kind::Node;
}

/// Why the store refused an object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object's `apiVersion`/`kind` is not one the double serves.
    #[error("apiVersion {api_version:?} kind {kind:?} is not served by the API-server double")]
    UnsupportedKind {
        /// The object's `apiVersion`.
        api_version: String,
        /// The object's `kind`.
        kind: String,
    },
    /// The object lacks something the API server requires.
    #[error("invalid object: {0}")]
    Invalid(String),
    /// A stored object did not deserialize into the requested type.
    #[error("stored object does not deserialize: {0}")]
    Json(#[from] serde_json::Error),
}

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One mutation, as kept in the history.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) ty: EventType,
    /// The resourceVersion the mutation produced.
    pub(crate) rv: u64,
    /// The object at `rv` (for a deletion: its last state, at `rv`).
    pub(crate) object: Arc<Value>,
    /// The object before the mutation (none for a creation); lets a
    /// selective watch turn "stopped matching" into DELETED.
    pub(crate) prev: Option<Arc<Value>>,
}

/// A watch or list that resumes from a resourceVersion the history no longer
/// covers (HTTP 410 Gone, reason Expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired;

/// A list result kept for its `continue` token.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) kind: Kind,
    pub(crate) rv: u64,
    pub(crate) items: Vec<Arc<Value>>,
    /// Whether pages report `remainingItemCount` (not with selectors).
    pub(crate) count_remaining: bool,
}

#[derive(Debug, Default)]
struct KindState {
    /// Current objects by (namespace, name); namespace "" if cluster-scoped.
    objects: BTreeMap<(String, String), Arc<Value>>,
    /// The latest events, oldest first.
    history: VecDeque<Event>,
    /// Every event with a resourceVersion above this is in `history`.
    complete_after: u64,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    next_uid: u64,
    kinds: [KindState; 3],
    snapshots: VecDeque<(u64, Arc<Snapshot>)>,
    next_snapshot: u64,
}

#[derive(Debug, Default)]
struct Counters {
    lists: AtomicU64,
    watches: AtomicU64,
    active_watches: AtomicUsize,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    history_limit: usize,
    /// The global resourceVersion after each mutation; wakes watches.
    rv_tx: watch::Sender<u64>,
    /// Bumped by [`Store::bookmark_now`]; wakes watches to send a bookmark.
    bookmark_tx: watch::Sender<u64>,
    counters: [Counters; 3],
}

/// The objects the double serves, shared by every server started on it
/// (cheap to clone; clones share everything).
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store keeping [`DEFAULT_HISTORY_LIMIT`] events per kind.
    pub fn new() -> Self {
        Self::with_history_limit(DEFAULT_HISTORY_LIMIT)
    }

    /// An empty store keeping `limit` (at least 1) events per kind; a watch
    /// that resumes from before the window gets 410 Expired.
    pub fn with_history_limit(limit: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                history_limit: limit.max(1),
                rv_tx: watch::Sender::new(0),
                bookmark_tx: watch::Sender::new(0),
                counters: Default::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data behind
        // (every mutation is a few infallible steps), so poison is ignored.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Creates or replaces a typed object; returns it as stored (with
    /// resourceVersion, uid and creationTimestamp set).
    pub fn apply<K: Served>(&self, object: &K) -> Result<K, Error> {
        let stored = self.apply_value(serde_json::to_value(object)?)?;
        Ok(serde_json::from_value(stored)?)
    }

    /// Creates or replaces an object given as JSON (with `apiVersion`,
    /// `kind`, `metadata.name`; a namespaced object without a namespace goes
    /// to `default`). Sets `metadata.resourceVersion` to the next global
    /// version, keeps `uid` and `creationTimestamp` of the object it replaces
    /// (or sets them when missing), and records an ADDED or MODIFIED event.
    /// Like the API server, a replacement that changes nothing is a no-op:
    /// no new resourceVersion, no event. Returns the object as stored.
    pub fn apply_value(&self, mut object: Value) -> Result<Value, Error> {
        let type_of = |field: &str| {
            object
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let (api_version, kind_name) = (type_of("apiVersion"), type_of("kind"));
        let kind = Kind::from_type(&api_version, &kind_name).ok_or(Error::UnsupportedKind {
            api_version,
            kind: kind_name,
        })?;
        let metadata = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| Error::Invalid("metadata is missing".into()))?;
        let name = match metadata.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => return Err(Error::Invalid("metadata.name is missing".into())),
        };
        let namespace = if kind.namespaced() {
            let ns = match metadata.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() => ns.to_owned(),
                _ => "default".to_owned(),
            };
            metadata.insert("namespace".into(), Value::from(ns.clone()));
            ns
        } else {
            metadata.remove("namespace");
            String::new()
        };

        let mut state = self.state();
        let key = (namespace, name);
        let prev = state.kinds[kind.index()].objects.get(&key).cloned();
        let inherited = |field: &str| prev.as_ref().and_then(|p| p.pointer(field)).cloned();
        match inherited("/metadata/uid") {
            Some(uid) => {
                metadata.insert("uid".into(), uid);
            }
            None if !metadata.contains_key("uid") => {
                state.next_uid += 1;
                let uid = format!("00000000-0000-4000-8000-{:012x}", state.next_uid);
                metadata.insert("uid".into(), Value::from(uid));
            }
            None => {}
        }
        match inherited("/metadata/creationTimestamp") {
            Some(created) => {
                metadata.insert("creationTimestamp".into(), created);
            }
            None if metadata.get("creationTimestamp").is_none_or(Value::is_null) => {
                metadata.insert("creationTimestamp".into(), now()?);
            }
            None => {}
        }
        if let Some(prev) = &prev {
            metadata.insert(
                "resourceVersion".into(),
                prev.pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
            if **prev == object {
                return Ok(object);
            }
        }

        state.rv += 1;
        let rv = state.rv;
        set_resource_version(&mut object, rv);
        let object = Arc::new(object);
        let ty = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let kind_state = &mut state.kinds[kind.index()];
        kind_state.objects.insert(key, object.clone());
        self.record(
            kind_state,
            Event {
                ty,
                rv,
                object: object.clone(),
                prev,
            },
        );
        drop(state);
        self.shared.rv_tx.send_replace(rv);
        Ok(Arc::unwrap_or_clone(object))
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds);
    /// returns its last state at the deletion's resourceVersion, which is
    /// also what the DELETED event carries. `None` if there was no such
    /// object (then nothing happens).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let mut state = self.state();
        let prev = state.kinds[kind.index()]
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))?;
        state.rv += 1;
        let rv = state.rv;
        let mut object = (*prev).clone();
        set_resource_version(&mut object, rv);
        let object = Arc::new(object);
        self.record(
            &mut state.kinds[kind.index()],
            Event {
                ty: EventType::Deleted,
                rv,
                object: object.clone(),
                prev: Some(prev),
            },
        );
        drop(state);
        self.shared.rv_tx.send_replace(rv);
        Some(Arc::unwrap_or_clone(object))
    }

    /// Typed [`Store::delete`].
    pub fn delete_object<K: Served>(&self, namespace: &str, name: &str) -> Option<K> {
        let deleted = self.delete(K::SERVED, namespace, name)?;
        serde_json::from_value(deleted).ok()
    }

    /// The stored object, if any (`namespace` is ignored for cluster-scoped
    /// kinds).
    pub fn get<K: Served>(&self, namespace: &str, name: &str) -> Option<K> {
        let namespace = if K::SERVED.namespaced() {
            namespace
        } else {
            ""
        };
        let object = self.get_value(K::SERVED, namespace, name)?;
        serde_json::from_value((*object).clone()).ok()
    }

    pub(crate) fn get_value(&self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.state().kinds[kind.index()]
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The current global resourceVersion (0 before the first mutation).
    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    /// Forgets every event so far, as a compaction (or an API server whose
    /// watch cache restarted) would: a watch resuming from a resourceVersion
    /// below the current one gets 410 Expired, and so does a `continue`
    /// token. Watches that are up to date are not affected.
    pub fn expire_history(&self) {
        let mut state = self.state();
        let rv = state.rv;
        for kind_state in &mut state.kinds {
            kind_state.history.clear();
            kind_state.complete_after = rv;
        }
        state.snapshots.clear();
        drop(state);
        // Wake watches, so that one that lags behind learns it expired.
        self.shared.rv_tx.send_replace(rv);
    }

    /// Asks every watch that allowed bookmarks to send one now.
    pub fn bookmark_now(&self) {
        self.shared
            .bookmark_tx
            .send_modify(|generation| *generation += 1);
    }

    /// List requests served for `kind` (every page counts), over all servers
    /// started on this store.
    pub fn list_requests(&self, kind: Kind) -> u64 {
        self.shared.counters[kind.index()]
            .lists
            .load(Ordering::Relaxed)
    }

    /// Watch requests served for `kind`, over all servers on this store.
    pub fn watch_requests(&self, kind: Kind) -> u64 {
        self.shared.counters[kind.index()]
            .watches
            .load(Ordering::Relaxed)
    }

    /// Watch streams of `kind` open right now.
    pub fn active_watches(&self, kind: Kind) -> usize {
        self.shared.counters[kind.index()]
            .active_watches
            .load(Ordering::Relaxed)
    }

    fn record(&self, kind_state: &mut KindState, event: Event) {
        kind_state.history.push_back(event);
        while kind_state.history.len() > self.shared.history_limit {
            if let Some(dropped) = kind_state.history.pop_front() {
                kind_state.complete_after = dropped.rv;
            }
        }
    }

    pub(crate) fn count_list(&self, kind: Kind) {
        self.shared.counters[kind.index()]
            .lists
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a watch request; the returned guard counts it as active until
    /// dropped.
    pub(crate) fn count_watch(&self, kind: Kind) -> ActiveWatch {
        let counters = &self.shared.counters[kind.index()];
        counters.watches.fetch_add(1, Ordering::Relaxed);
        counters.active_watches.fetch_add(1, Ordering::Relaxed);
        ActiveWatch {
            store: self.clone(),
            kind,
        }
    }

    /// The matching objects (sorted by namespace, name) and the current
    /// resourceVersion, read atomically.
    pub(crate) fn select(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (u64, Vec<Arc<Value>>) {
        let state = self.state();
        let items = state.kinds[kind.index()]
            .objects
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
            .filter(|(_, object)| labels.matches(object) && fields.matches(object))
            .map(|(_, object)| object.clone())
            .collect();
        (state.rv, items)
    }

    /// Keeps a list result for `continue` tokens; returns its id.
    pub(crate) fn keep_snapshot(&self, snapshot: Snapshot) -> u64 {
        let mut state = self.state();
        state.next_snapshot += 1;
        let id = state.next_snapshot;
        state.snapshots.push_back((id, Arc::new(snapshot)));
        while state.snapshots.len() > SNAPSHOT_LIMIT {
            state.snapshots.pop_front();
        }
        id
    }

    /// A kept list result, unless it has been forgotten.
    pub(crate) fn snapshot(&self, id: u64) -> Option<Arc<Snapshot>> {
        self.state()
            .snapshots
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, s)| s.clone())
    }

    /// The events of `kind` after resourceVersion `since`, and the global
    /// resourceVersion they bring a watcher to.
    pub(crate) fn events_since(
        &self,
        kind: Kind,
        since: u64,
    ) -> Result<(Vec<Event>, u64), Expired> {
        let state = self.state();
        let kind_state = &state.kinds[kind.index()];
        if since < kind_state.complete_after {
            return Err(Expired);
        }
        let events = kind_state
            .history
            .iter()
            .filter(|e| e.rv > since)
            .cloned()
            .collect();
        Ok((events, state.rv.max(since)))
    }

    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.shared.rv_tx.subscribe()
    }

    pub(crate) fn subscribe_bookmarks(&self) -> watch::Receiver<u64> {
        self.shared.bookmark_tx.subscribe()
    }
}

/// Counts an open watch stream until dropped.
#[derive(Debug)]
pub(crate) struct ActiveWatch {
    store: Store,
    kind: Kind,
}

impl Drop for ActiveWatch {
    fn drop(&mut self) {
        self.store.shared.counters[self.kind.index()]
            .active_watches
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The current time as the API server writes timestamps (whole seconds).
fn now() -> Result<Value, Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let timestamp = i64::try_from(seconds)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH);
    Ok(serde_json::to_value(Time(timestamp))?)
}

fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert("resourceVersion".into(), Value::from(rv.to_string()));
    }
}
