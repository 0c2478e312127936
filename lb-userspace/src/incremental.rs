//! The desired state kept current between syncs, so that a change costs
//! what it touches.
//!
//! Translation has two steps (see [`crate::translate`]): each Service is
//! translated on its own ([`translate_service`], a function of the Service,
//! its EndpointSlices and the node), then the Services are admitted oldest
//! first ([`Arbiter`]: frontend claims, capacity). [`DesiredState`] keeps
//! every Service's translation and the admitted result. An update names the
//! Services that changed; only those are translated again, and only those
//! are re-admitted when nothing else can be affected:
//!
//! * none of the frontends they claim, before or after, is claimed by a
//!   Service outside the update (so no winner elsewhere can change), and
//! * everything every Service asks for fits in the maps, before and after
//!   (so no Service is left out for capacity, nor let back in).
//!
//! Otherwise every Service is admitted again from the kept translations
//! (no object is translated again) and the whole state is planned. The
//! result is always what [`crate::translate::translate_with`] gives for the
//! same objects; a property test checks it after random sequences of
//! changes.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Desired, ServicePort, ServicePortName};
use crate::source::Objects;
use crate::translate::{
    Arbiter, Capacity, ClaimKey, NodeContext, OrderKey, ServiceKey, ServiceTranslation, Skipped,
    TranslateOptions, slices_by_service, translate_service,
};

/// Which Services an update covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every Service: the objects are the whole set.
    All,
    /// These Services: the objects hold each of them that exists (one
    /// missing was deleted) and all their EndpointSlices.
    Services(BTreeSet<ServiceKey>),
}

/// What an update changed in the desired state.
#[derive(Clone, Debug, PartialEq)]
pub enum Changed {
    /// Possibly anything: plan everything.
    All,
    /// Only these service ports, with what they were before (`None`: they
    /// did not exist).
    Ports(BTreeMap<ServicePortName, Option<ServicePort>>),
}

impl Changed {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        matches!(self, Changed::Ports(p) if p.is_empty())
    }
}

/// The desired state of this node and the per-Service translations it is
/// made of.
#[derive(Clone, Debug)]
pub struct DesiredState {
    node: NodeContext,
    opts: TranslateOptions,
    /// Every Service's own translation.
    services: BTreeMap<ServiceKey, ServiceTranslation>,
    /// The Services in admission order.
    order: BTreeSet<(OrderKey, ServiceKey)>,
    /// Frontend → the Services whose ports ask for it (admitted or not).
    claimants: BTreeMap<ClaimKey, BTreeSet<ServiceKey>>,
    /// What every Service asks for, summed.
    wants: Capacity,
    arbiter: Arbiter,
    /// Per Service: its admitted service ports and the ports left out by
    /// admission.
    admitted: BTreeMap<ServiceKey, (Vec<ServicePortName>, Vec<Skipped>)>,
    desired: Desired,
    /// Every report, in admission order: rebuilt only when an update
    /// touches a Service that has or had one.
    skipped: Vec<Skipped>,
    warnings: Vec<String>,
}

impl DesiredState {
    /// An empty state for `node`.
    pub fn new(node: NodeContext, opts: TranslateOptions) -> Self {
        let arbiter = Arbiter::new(opts.capacity);
        Self {
            node,
            opts,
            services: BTreeMap::new(),
            order: BTreeSet::new(),
            claimants: BTreeMap::new(),
            wants: Capacity::ZERO,
            arbiter,
            admitted: BTreeMap::new(),
            desired: Desired::default(),
            skipped: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// What this node should balance now.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Everything left out, Service by Service in admission order (as
    /// [`crate::translate::Translation::skipped`]).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The warnings of every Service, in admission order.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether `key` has anything to report now.
    fn reports(&self, key: &ServiceKey) -> bool {
        let own = self
            .services
            .get(key)
            .is_some_and(|t| !t.skipped.is_empty() || !t.warnings.is_empty());
        own || self.admitted.get(key).is_some_and(|(_, s)| !s.is_empty())
    }

    fn collect_reports(&mut self) {
        self.skipped.clear();
        self.warnings.clear();
        for (_, key) in &self.order {
            let t = &self.services[key];
            self.skipped.extend(t.skipped.iter().cloned());
            if let Some((_, s)) = self.admitted.get(key) {
                self.skipped.extend(s.iter().cloned());
            }
            self.warnings.extend(t.warnings.iter().cloned());
        }
    }

    /// Takes in the objects of `scope` and says what changed.
    pub fn update(&mut self, scope: &Scope, objs: &Objects) -> Changed {
        let reported_before = match scope {
            Scope::All => true,
            Scope::Services(keys) => keys.iter().any(|k| self.reports(k)),
        };
        let changed = self.take_in(scope, objs);
        let reports_now = match scope {
            Scope::All => true,
            Scope::Services(keys) => keys.iter().any(|k| self.reports(k)),
        };
        if reported_before || reports_now || changed == Changed::All {
            self.collect_reports();
        }
        changed
    }

    fn take_in(&mut self, scope: &Scope, objs: &Objects) -> Changed {
        match scope {
            Scope::All => {
                self.services.clear();
                self.order.clear();
                self.claimants.clear();
                self.wants = Capacity::ZERO;
                let keys = objs.services.iter().map(ServiceKey::of).collect();
                self.retranslate(&keys, objs);
                self.admit_all();
                Changed::All
            }
            Scope::Services(keys) => {
                let fitted = self.wants.within(&self.opts.capacity);
                let mut claimed: BTreeSet<ClaimKey> = keys
                    .iter()
                    .filter_map(|k| self.services.get(k))
                    .flat_map(|t| t.claim_keys())
                    .collect();
                self.retranslate(keys, objs);
                claimed.extend(
                    keys.iter()
                        .filter_map(|k| self.services.get(k))
                        .flat_map(|t| t.claim_keys()),
                );
                let alone = claimed.iter().all(|c| {
                    self.claimants
                        .get(c)
                        .is_none_or(|owners| owners.is_subset(keys))
                });
                if alone && fitted && self.wants.within(&self.opts.capacity) {
                    Changed::Ports(self.readmit(keys))
                } else {
                    self.admit_all();
                    Changed::All
                }
            }
        }
    }

    /// Translates the Services `keys` again from `objs` (a key without a
    /// Service there: deleted).
    fn retranslate(&mut self, keys: &BTreeSet<ServiceKey>, objs: &Objects) {
        for key in keys {
            if let Some(old) = self.services.remove(key) {
                self.unindex(key, &old);
            }
        }
        let slices = slices_by_service(&objs.slices);
        for svc in &objs.services {
            let key = ServiceKey::of(svc);
            if !keys.contains(&key) {
                continue;
            }
            let own = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
            let t = translate_service(svc, own, objs, &self.node, &self.opts);
            self.index(&key, &t);
            self.services.insert(key, t);
        }
    }

    fn index(&mut self, key: &ServiceKey, t: &ServiceTranslation) {
        self.order.insert((t.order.clone(), key.clone()));
        for c in t.claim_keys() {
            self.claimants.entry(c).or_default().insert(key.clone());
        }
        self.wants.add(&t.wants(), 1);
    }

    fn unindex(&mut self, key: &ServiceKey, t: &ServiceTranslation) {
        self.order.remove(&(t.order.clone(), key.clone()));
        for c in t.claim_keys() {
            if let Some(owners) = self.claimants.get_mut(&c) {
                owners.remove(key);
                if owners.is_empty() {
                    self.claimants.remove(&c);
                }
            }
        }
        self.wants.add(&t.wants(), -1);
    }

    /// Admits every Service again, in order.
    fn admit_all(&mut self) {
        self.arbiter = Arbiter::new(self.opts.capacity);
        self.admitted.clear();
        self.desired.services.clear();
        for (_, key) in &self.order {
            let (ports, skipped) = self.arbiter.admit(&self.services[key]);
            let names = ports.iter().map(|(n, _)| n.clone()).collect();
            self.desired.services.extend(ports);
            self.admitted.insert(key.clone(), (names, skipped));
        }
    }

    /// Admits the Services `keys` again, alone (see the module doc for
    /// when that gives the same result as [`DesiredState::admit_all`]);
    /// returns the service ports that changed, with what they were.
    fn readmit(
        &mut self,
        keys: &BTreeSet<ServiceKey>,
    ) -> BTreeMap<ServicePortName, Option<ServicePort>> {
        let mut before: BTreeMap<ServicePortName, Option<ServicePort>> = BTreeMap::new();
        for key in keys {
            let Some((names, _)) = self.admitted.remove(key) else {
                continue;
            };
            for n in names {
                let old = self.desired.services.remove(&n);
                if let Some(sp) = &old {
                    self.arbiter.release([(&n, sp)]);
                }
                before.insert(n, old);
            }
        }
        let mut order: Vec<&(OrderKey, ServiceKey)> = Vec::new();
        for key in keys {
            if let Some(t) = self.services.get(key) {
                order.push(
                    self.order
                        .get(&(t.order.clone(), key.clone()))
                        .expect("indexed"),
                );
            }
        }
        order.sort();
        let order: Vec<ServiceKey> = order.into_iter().map(|(_, k)| k.clone()).collect();
        for key in order {
            let (ports, skipped) = self.arbiter.admit(&self.services[&key]);
            let names: Vec<ServicePortName> = ports.iter().map(|(n, _)| n.clone()).collect();
            for (n, sp) in ports {
                before.entry(n.clone()).or_insert(None);
                self.desired.services.insert(n, sp);
            }
            self.admitted.insert(key, (names, skipped));
        }
        before.retain(|n, old| old.as_ref() != self.desired.services.get(n));
        before
    }
}
