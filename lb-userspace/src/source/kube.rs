//! The Kubernetes source: kube-rs reflectors on Services, EndpointSlices and
//! this node's Node. It only keeps the objects; the agent turns a snapshot
//! into map operations through the same translation and planner as the
//! manifests source.
//!
//! Each watch event marks the Service it touches (an EndpointSlice's, by
//! its `kubernetes.io/service-name` label, before and after); a re-list
//! marks everything. [`KubeSource::take_update`] hands out the marked
//! Services' objects, so a change costs what it touches.
//!
//! Sync discipline: [`KubeSource::snapshot`] returns `None` until every kind
//! has completed its initial list, so a restarted agent deletes nothing
//! before it has seen the whole cluster. While the API server is unreachable
//! the stores keep their last state (and so do the maps); the watchers retry
//! with a short backoff (at most 5 s) and, after a `410 Gone`, re-list; a reflector swaps in a
//! re-listed store only when the list is complete.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Objects;
use crate::error::{Error, Result};
use crate::incremental::Scope;
use crate::translate::ServiceKey;

/// Label that hands a Service to another proxy (kube-proxy skips those too).
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label set on the EndpointSlices of headless Services.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Retry delays of a failing watch: 100 ms doubling to 5 s, ±20% jitter so
/// that the agents of a large cluster do not reconnect in step; reset after a
/// success. (kube's default backoff grows to 30 s, which would leave a node
/// stale for half a minute after a short API-server outage.)
struct WatchBackoff {
    next: Duration,
    seed: u64,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        Self {
            next: Self::MIN,
            seed: RandomState::new().hash_one(std::process::id()),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift for the jitter; no need for a real RNG here.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = 0.8 + (self.seed % 400) as f64 / 1000.0;
        let d = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(Self::MAX);
        Some(d)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// A client from `kubeconfig` if given, else the in-cluster configuration
/// (then `KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| Error::Config(format!("no Kubernetes configuration: {e}")))?,
    };
    Client::try_from(config).map_err(|e| Error::Config(format!("Kubernetes client: {e}")))
}

/// The three reflector stores.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    dirty: Arc<Mutex<Dirty>>,
}

/// What changed since the agent last took an update.
#[derive(Debug, Default)]
struct Dirty {
    /// Everything (a re-list, or nothing taken yet).
    all: bool,
    services: BTreeSet<ServiceKey>,
    /// EndpointSlice (namespace, name) → the Service it was last labelled
    /// with, so that a relabelled slice marks both Services.
    slice_owner: HashMap<(String, String), ServiceKey>,
    /// Service → the names of its EndpointSlices (the inverse of
    /// `slice_owner`), so that an update finds them without a pass over
    /// every slice.
    slices_of: HashMap<ServiceKey, BTreeSet<String>>,
}

impl Dirty {
    /// Records that slice `id` is labelled with `owner` now; the Service it
    /// was labelled with before.
    fn set_owner(&mut self, id: (String, String), owner: Option<ServiceKey>) -> Option<ServiceKey> {
        let old = match &owner {
            Some(k) => self.slice_owner.insert(id.clone(), k.clone()),
            None => self.slice_owner.remove(&id),
        };
        if let Some(o) = &old
            && let Some(names) = self.slices_of.get_mut(o)
        {
            names.remove(&id.1);
            if names.is_empty() {
                self.slices_of.remove(o);
            }
        }
        if let Some(k) = owner {
            self.slices_of.entry(k).or_default().insert(id.1);
        }
        old
    }

    fn service(&mut self, ev: &watcher::Event<Service>) {
        match ev {
            watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                self.services.insert(ServiceKey::of(s));
            }
            watcher::Event::InitDone => self.all = true,
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    fn slice(&mut self, ev: &watcher::Event<EndpointSlice>) {
        let id = |s: &EndpointSlice| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        };
        match ev {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                let new = ServiceKey::of_slice(s);
                let old = self.set_owner(id(s), new.clone());
                // A re-list marks everything at its end.
                if matches!(ev, watcher::Event::Apply(_)) {
                    self.services.extend(old);
                    self.services.extend(new);
                }
            }
            watcher::Event::Delete(s) => {
                let old = self.set_owner(id(s), None);
                self.services.extend(old);
                self.services.extend(ServiceKey::of_slice(s));
            }
            watcher::Event::InitDone => self.all = true,
            watcher::Event::Init => {}
        }
    }
}

impl KubeSource {
    /// Starts the watchers on `client`'s runtime. Each change (after the
    /// stores are ready) sends `()` on the returned channel, coalesced: a
    /// burst of events wakes the agent once.
    pub fn start(client: Client, node_name: &str) -> (Self, mpsc::Receiver<()>) {
        let (svc_store, svc_writer) = reflector::store();
        let (eps_store, eps_writer) = reflector::store();
        let (node_store, node_writer) = reflector::store();

        let svc_cfg = watcher::Config::default().labels(&format!("!{PROXY_NAME_LABEL}"));
        let eps_cfg =
            watcher::Config::default().labels(&format!("!{PROXY_NAME_LABEL},!{HEADLESS_LABEL}"));
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));

        let dirty = Arc::new(Mutex::new(Dirty {
            all: true,
            ..Default::default()
        }));
        // Marks what an event touched (after the reflector applied it to
        // its store, so a taken update always sees it).
        fn kind<K>(
            name: &'static str,
            s: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
            dirty: Arc<Mutex<Dirty>>,
            mark: fn(&mut Dirty, &watcher::Event<K>),
        ) -> BoxStream<'static, (&'static str, std::result::Result<(), String>)>
        where
            K: Send + 'static,
        {
            s.map(move |r| {
                if let (Ok(ev), Ok(mut d)) = (&r, dirty.lock()) {
                    mark(&mut d, ev);
                }
                (name, r.map(|_| ()).map_err(|e| e.to_string()))
            })
            .boxed()
        }
        let streams = vec![
            kind(
                "Service",
                reflector::reflector(
                    svc_writer,
                    watcher(Api::<Service>::all(client.clone()), svc_cfg),
                )
                .backoff(WatchBackoff::new()),
                dirty.clone(),
                Dirty::service,
            ),
            kind(
                "EndpointSlice",
                reflector::reflector(
                    eps_writer,
                    watcher(Api::<EndpointSlice>::all(client.clone()), eps_cfg),
                )
                .backoff(WatchBackoff::new()),
                dirty.clone(),
                Dirty::slice,
            ),
            kind(
                "Node",
                reflector::reflector(node_writer, watcher(Api::<Node>::all(client), node_cfg))
                    .backoff(WatchBackoff::new()),
                dirty.clone(),
                // The Node is not translated: nothing to mark.
                |_, _| {},
            ),
        ];
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut all = futures::stream::select_all(streams);
            let mut failing = false;
            while let Some((kind, r)) = all.next().await {
                match r {
                    Ok(()) => {
                        if failing {
                            warn!("Kubernetes API reachable again ({kind} watch resumed)");
                            failing = false;
                        }
                        // Full channel = a wake-up is already pending.
                        let _ = tx.try_send(());
                    }
                    Err(e) => {
                        if !failing {
                            warn!(
                                "{kind} watch failed, retrying with backoff; the datapath keeps its last state: {e}"
                            );
                        } else {
                            debug!("{kind} watch still failing: {e}");
                        }
                        failing = true;
                    }
                }
            }
        });
        (
            Self {
                services: svc_store,
                slices: eps_store,
                node: node_store,
                dirty,
            },
            rx,
        )
    }

    /// True once every kind has completed its initial list.
    pub fn ready(&self) -> bool {
        // A store is ready after its first complete list.
        fn ready<K>(s: &Store<K>) -> bool
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            s.wait_until_ready()
                .now_or_never()
                .is_some_and(|r| r.is_ok())
        }
        ready(&self.services) && ready(&self.slices) && ready(&self.node)
    }

    /// The objects now, or `None` before every kind has been listed.
    pub fn snapshot(&self) -> Option<Objects> {
        if !self.ready() {
            return None;
        }
        fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
            v.into_iter().map(|o| (*o).clone()).collect()
        }
        Some(Objects {
            services: owned(self.services.state()),
            slices: owned(self.slices.state()),
            origins: Default::default(),
        })
    }

    /// The objects of what changed since the last call, or `None` before
    /// every kind has been listed. The first update after the lists, and
    /// the first after a re-list, is everything.
    pub fn take_update(&self) -> Option<(Scope, Objects)> {
        if !self.ready() {
            return None;
        }
        let (all, keys, slice_names) = {
            let mut d = self.dirty.lock().ok()?;
            let all = std::mem::take(&mut d.all);
            let keys = std::mem::take(&mut d.services);
            let names: Vec<(String, String)> = keys
                .iter()
                .flat_map(|k| {
                    d.slices_of
                        .get(k)
                        .into_iter()
                        .flatten()
                        .map(|n| (k.namespace.clone(), n.clone()))
                })
                .collect();
            (all, keys, names)
        };
        if all {
            return Some((Scope::All, self.snapshot()?));
        }
        let services = keys
            .iter()
            .filter_map(|k| {
                let r = reflector::ObjectRef::new(&k.name).within(&k.namespace);
                self.services.get(&r)
            })
            .map(|s| (*s).clone())
            .collect();
        // The index may be a moment behind the store: a slice is taken only
        // if the store's version still names one of the Services.
        let slices = slice_names
            .iter()
            .filter_map(|(ns, name)| self.slices.get(&reflector::ObjectRef::new(name).within(ns)))
            .filter(|s| ServiceKey::of_slice(s).is_some_and(|k| keys.contains(&k)))
            .map(|s| (*s).clone())
            .collect();
        let objects = Objects {
            services,
            slices,
            origins: Default::default(),
        };
        Some((Scope::Services(keys), objects))
    }

    /// This node's Node object, if the API server has one.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.state().into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: Option<&str>) -> EndpointSlice {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            ..Default::default()
        };
        s.metadata.namespace = Some("a".into());
        s.metadata.name = Some(name.into());
        s.metadata.labels = service.map(|svc| {
            [(
                crate::translate::LABEL_SERVICE_NAME.to_owned(),
                svc.to_owned(),
            )]
            .into()
        });
        s
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: "a".into(),
            name: name.into(),
        }
    }

    fn taken(d: &mut Dirty) -> Vec<String> {
        std::mem::take(&mut d.services)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_slice_event_marks_its_service_before_and_after_a_relabel() {
        let mut d = Dirty::default();
        // Listed: indexed, nothing marked until the list is done.
        d.slice(&watcher::Event::InitApply(slice("e1", Some("web"))));
        assert!(taken(&mut d).is_empty());
        d.slice(&watcher::Event::InitDone);
        assert!(d.all);
        assert_eq!(d.slices_of[&key("web")], ["e1".to_owned()].into());

        d.slice(&watcher::Event::Apply(slice("e1", Some("web"))));
        assert_eq!(taken(&mut d), ["a/web"]);
        // Relabelled: both Services change; the index follows.
        d.slice(&watcher::Event::Apply(slice("e1", Some("api"))));
        assert_eq!(taken(&mut d), ["a/api", "a/web"]);
        assert!(!d.slices_of.contains_key(&key("web")));
        assert_eq!(d.slices_of[&key("api")], ["e1".to_owned()].into());
        // Label removed, then deleted: the last owner is marked each time.
        d.slice(&watcher::Event::Apply(slice("e1", None)));
        assert_eq!(taken(&mut d), ["a/api"]);
        assert!(d.slices_of.is_empty());
        d.slice(&watcher::Event::Apply(slice("e2", Some("web"))));
        d.slice(&watcher::Event::Delete(slice("e2", Some("web"))));
        assert_eq!(taken(&mut d), ["a/web"]);
        assert!(d.slices_of.is_empty() && d.slice_owner.is_empty());
    }

    #[test]
    fn a_service_event_marks_it_and_a_relist_marks_everything() {
        let mut d = Dirty::default();
        let mut svc = Service::default();
        svc.metadata.namespace = Some("a".into());
        svc.metadata.name = Some("web".into());
        d.service(&watcher::Event::Apply(svc.clone()));
        d.service(&watcher::Event::Delete(svc));
        assert_eq!(taken(&mut d), ["a/web"]);
        assert!(!d.all);
        d.service(&watcher::Event::Init);
        assert!(!d.all);
        d.service(&watcher::Event::InitDone);
        assert!(d.all);
    }
}
