//! A pure model of the open-flow counting protocol, step for step as the
//! datapath (`lb-ebpf/src/flows.rs`, `ingress.rs`, `reply.rs`) and the
//! collector (`gc.rs`) run it, for property tests: whatever happens
//! (opens, FINs, RSTs, idle timeouts, conntrack evictions, endpoint churn,
//! agent restarts, a full registry), every count equals the number of
//! registry entries holding a token of its backend, and once each live flow
//! has sent a packet and the collector has run, the number of live flows on
//! it.
//!
//! The rules it mirrors:
//! * every pin takes a new token (a sequence number and the backend), kept
//!   in the flow's conntrack entry;
//! * `open`: install the token: insert the entry, or reuse the key's closed
//!   one (counts up); the key holds this token: no change; another token,
//!   or a full registry: not counted (`flows_untracked`);
//! * `close`: only the caller that swaps the entry from its token to closed
//!   counts down (the token names the backend);
//! * a pin closes the token of the entry it replaces (re-balance, or a new
//!   connection on the tuple of one that ended);
//! * the collector counts down flows it expires, and counted entries whose
//!   conntrack entry is gone, holds another token, or whose backend left
//!   the service; counts live flows whose token the registry does not hold;
//!   deletes closed entries.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{FLOW_CLOSED, flow_token, token_backend, token_live};

/// A flow (its 5-tuple, abstracted).
pub type Flow = u32;
/// A backend id.
pub type BackendId = u32;

/// What one packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet {
    /// Client SYN (XDP).
    Syn,
    /// Client data (XDP).
    Data,
    /// Client FIN (XDP).
    FinClient,
    /// Pod FIN (TC).
    FinPod,
    /// Client RST (XDP).
    RstClient,
    /// Pod RST (TC).
    RstPod,
}

#[derive(Clone, Copy, Debug, Default)]
struct Ct {
    backend: BackendId,
    token: u64,
    fin_client: bool,
    fin_pod: bool,
    rst: bool,
}

impl Ct {
    fn ended(&self) -> bool {
        self.rst || (self.fin_client && self.fin_pod)
    }
}

/// The datapath's maps as far as counting goes.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// `LB_OPEN_FLOWS_V4`: flow → its entry's `open` word (a token, or
    /// `FLOW_CLOSED`).
    pub registry: BTreeMap<Flow, u64>,
    /// `LB_BE_OPEN`.
    pub counts: BTreeMap<BackendId, u64>,
    ct: BTreeMap<Flow, Ct>,
    /// Usable backends (ascending).
    pub active: BTreeSet<BackendId>,
    /// Registry capacity.
    pub capacity: usize,
    /// `Stats::flows_untracked`.
    pub untracked: u64,
    /// `LB_FLOW_SEQ`.
    seq: u64,
}

impl Model {
    /// Empty maps with `backends` usable and a registry of `capacity`.
    pub fn new(backends: impl IntoIterator<Item = BackendId>, capacity: usize) -> Self {
        Self {
            active: backends.into_iter().collect(),
            capacity,
            ..Default::default()
        }
    }

    fn next_token(&mut self, b: BackendId) -> u64 {
        self.seq += 1;
        flow_token(self.seq, b)
    }

    /// Installs `token` for `f`; true if this call counted it up.
    fn install(&mut self, f: Flow, token: u64) -> bool {
        match self.registry.get(&f).copied() {
            None if self.registry.len() >= self.capacity => return false,
            None => {}
            Some(FLOW_CLOSED) => {}
            Some(_) => return false, // this token (counted) or another one
        }
        self.registry.insert(f, token);
        *self.counts.entry(token_backend(token)).or_default() += 1;
        true
    }

    fn open(&mut self, f: Flow, token: u64) {
        if self.registry.get(&f) != Some(&token) && !self.install(f, token) {
            self.untracked += 1;
        }
    }

    /// Counts `f` down if its entry holds `token` (this call swaps it).
    pub fn close(&mut self, f: Flow, token: u64) -> bool {
        if !token_live(token) || self.registry.get(&f) != Some(&token) {
            return false;
        }
        self.registry.insert(f, FLOW_CLOSED);
        let c = self.counts.entry(token_backend(token)).or_default();
        *c = c.checked_sub(1).expect("a count never goes below zero");
        true
    }

    /// Least-connection over the usable backends (the policy matters little
    /// here; it exercises counts feeding choices).
    fn choose(&self) -> Option<BackendId> {
        let open = |b: BackendId| self.counts.get(&b).copied().unwrap_or(0);
        let ids: Vec<BackendId> = self.active.iter().copied().collect();
        let first = *ids.first()?;
        Some(lb_common::policy::least_conn(&ids, first, first, open).0)
    }

    /// One packet of flow `f` through XDP or TC.
    pub fn packet(&mut self, f: Flow, p: Packet) {
        match p {
            Packet::FinPod | Packet::RstPod => {
                // TC: only a flow with a reply entry.
                let Some(ct) = self.ct.get_mut(&f) else {
                    return;
                };
                let token = ct.token;
                if p == Packet::RstPod {
                    ct.rst = true;
                    self.close(f, token);
                } else {
                    ct.fin_pod = true;
                    if ct.fin_client {
                        self.close(f, token);
                    }
                }
            }
            _ => {
                let found = self.ct.get(&f).copied();
                let hit =
                    found.filter(|c| self.active.contains(&c.backend) || self.kept(c.backend));
                match hit {
                    Some(c) => {
                        let ct = self.ct.get_mut(&f).expect("hit");
                        match p {
                            Packet::RstClient => {
                                ct.rst = true;
                                self.close(f, c.token);
                            }
                            Packet::FinClient => {
                                ct.fin_client = true;
                                if ct.fin_pod {
                                    self.close(f, c.token);
                                }
                            }
                            Packet::Syn if c.ended() => {
                                // A new connection on the tuple: a new
                                // token; the ended one's is closed.
                                let token = self.next_token(c.backend);
                                self.ct.insert(
                                    f,
                                    Ct {
                                        backend: c.backend,
                                        token,
                                        ..Ct::default()
                                    },
                                );
                                self.close(f, c.token);
                                self.open(f, token);
                            }
                            Packet::Syn => self.open(f, c.token),
                            _ => {}
                        }
                    }
                    None => {
                        // New or re-balanced flow: choose, pin, count.
                        let Some(b) = self.choose() else { return };
                        let token = self.next_token(b);
                        self.ct.insert(
                            f,
                            Ct {
                                backend: b,
                                token,
                                fin_client: p == Packet::FinClient,
                                rst: p == Packet::RstClient,
                                ..Ct::default()
                            },
                        );
                        self.close(f, found.map_or(0, |c| c.token));
                        if p != Packet::RstClient {
                            self.open(f, token);
                        }
                    }
                }
            }
        }
    }

    /// Terminating backends keep their flows; removed ones do not. The
    /// model removes backends outright (churn), so nothing is kept.
    fn kept(&self, _b: BackendId) -> bool {
        false
    }

    /// The LRU evicts `f`'s conntrack entry without telling anyone.
    pub fn evict(&mut self, f: Flow) {
        self.ct.remove(&f);
    }

    /// The collector ends `f` (idle timeout): counts it down, then drops
    /// its conntrack entry.
    pub fn expire(&mut self, f: Flow) {
        if let Some(c) = self.ct.remove(&f) {
            self.close(f, c.token);
        }
    }

    /// The collector's pass (every entry older than the grace): closed flows
    /// (RST, FIN both ways) go, and the registry is reconciled with
    /// conntrack.
    pub fn collect(&mut self) {
        let snapshot = self.registry.clone();
        let done: Vec<Flow> = self
            .ct
            .iter()
            .filter(|(_, c)| c.ended())
            .map(|(f, _)| *f)
            .collect();
        for f in done {
            self.expire(f);
        }
        for (&f, &word) in snapshot.iter().filter(|(_, w)| token_live(**w)) {
            let still = self
                .ct
                .get(&f)
                .is_some_and(|c| c.token == word && self.active.contains(&c.backend));
            if !still {
                self.close(f, word);
            }
        }
        let live: Vec<(Flow, Ct)> = self
            .ct
            .iter()
            .filter(|(_, c)| !c.ended() && self.active.contains(&c.backend))
            .map(|(f, c)| (*f, *c))
            .collect();
        for (f, c) in live {
            if snapshot.get(&f) != Some(&c.token) {
                self.install(f, c.token);
            }
        }
        for (f, _) in snapshot.iter().filter(|(_, w)| **w == FLOW_CLOSED) {
            if self.registry.get(f) == Some(&FLOW_CLOSED) {
                self.registry.remove(f);
            }
        }
    }

    /// Endpoint churn: backend `b` leaves the service.
    pub fn remove_backend(&mut self, b: BackendId) {
        self.active.remove(&b);
    }

    /// Endpoint churn: a new backend joins, with an id never used before
    /// (the planner hands out never-used ids first). Returns its id.
    pub fn add_backend(&mut self) -> BackendId {
        let b = self
            .active
            .iter()
            .chain(self.counts.keys())
            .max()
            .map_or(1, |m| m + 1);
        self.active.insert(b);
        b
    }

    /// The agent restarts: it keeps no state of its own about counts, so
    /// nothing in the maps changes.
    pub fn restart_agent(&mut self) {}

    /// Every count equals the registry entries holding a token of its
    /// backend.
    pub fn consistent(&self) -> bool {
        let mut by: BTreeMap<BackendId, u64> = BTreeMap::new();
        for w in self.registry.values().filter(|w| token_live(**w)) {
            *by.entry(token_backend(*w)).or_default() += 1;
        }
        self.counts
            .iter()
            .all(|(b, n)| by.get(b).copied().unwrap_or(0) == *n)
            && by.iter().all(|(b, n)| self.counts.get(b) == Some(n))
    }

    /// The flows conntrack holds.
    pub fn flows(&self) -> Vec<Flow> {
        self.ct.keys().copied().collect()
    }

    /// The backend conntrack pins `f` to.
    pub fn pinned(&self, f: Flow) -> Option<BackendId> {
        self.ct.get(&f).map(|c| c.backend)
    }

    /// True if the registry holds `f`'s own token (from its conntrack entry).
    pub fn counted(&self, f: Flow) -> bool {
        self.ct
            .get(&f)
            .is_some_and(|c| self.registry.get(&f) == Some(&c.token))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        Packet(Flow, Packet),
        Timeout(Flow),
        Evict(Flow),
        RemoveBackend(BackendId),
        AddBackend,
        Collect,
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        let flow = 0u32..12;
        let packet = prop_oneof![
            Just(Packet::Syn),
            Just(Packet::Data),
            Just(Packet::FinClient),
            Just(Packet::FinPod),
            Just(Packet::RstClient),
            Just(Packet::RstPod),
        ];
        prop_oneof![
            6 => (flow.clone(), packet).prop_map(|(f, p)| Step::Packet(f, p)),
            1 => flow.clone().prop_map(Step::Timeout),
            1 => flow.prop_map(Step::Evict),
            1 => (1u32..7).prop_map(Step::RemoveBackend),
            1 => Just(Step::AddBackend),
            1 => Just(Step::Collect),
            1 => Just(Step::Restart),
        ]
    }

    /// The client's view: which flows are open (SYN sent, not ended by a
    /// RST, by FIN both ways or by an idle timeout), and the pod that holds
    /// each connection.
    #[derive(Default)]
    struct Truth {
        open: BTreeMap<Flow, (bool, bool)>,
        pod: BTreeMap<Flow, BackendId>,
    }

    /// After an XDP packet of a live flow: a flow re-pinned to a pod that
    /// does not hold its connection (its own left, or its conntrack entry
    /// was evicted and the policy chose another) gets a RST from that pod,
    /// as TCP does, and ends.
    fn pod_answers(m: &mut Model, truth: &mut Truth, f: Flow, p: Packet) {
        if p == Packet::Syn {
            if let Some(b) = m.pinned(f)
                && truth.pod.insert(f, b) != Some(b)
            {
                // Another pod accepts the SYN: a new connection.
                truth.open.insert(f, (false, false));
            }
            return;
        }
        if matches!(p, Packet::FinPod | Packet::RstPod) || !truth.open.contains_key(&f) {
            return;
        }
        if m.pinned(f) != truth.pod.get(&f).copied() {
            m.packet(f, Packet::RstPod);
            truth.open.remove(&f);
        }
    }

    impl Truth {
        fn apply(&mut self, s: &Step) {
            match *s {
                Step::Packet(f, Packet::Syn) => {
                    // A SYN of a live connection is a retransmission; after
                    // the end it starts a new one (and see `pod_answers`).
                    self.open.entry(f).or_default();
                }
                Step::Packet(f, Packet::RstClient | Packet::RstPod) | Step::Timeout(f) => {
                    self.open.remove(&f);
                }
                Step::Packet(f, Packet::FinClient) => {
                    if let Some(e) = self.open.get_mut(&f) {
                        e.0 = true;
                    }
                }
                Step::Packet(f, Packet::FinPod) => {
                    if let Some(e) = self.open.get_mut(&f) {
                        e.1 = true;
                    }
                }
                _ => {}
            }
            self.open.retain(|_, (c, p)| !(*c && *p));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn counts_equal_the_open_flows(steps in proptest::collection::vec(step(), 1..120)) {
            let mut m = Model::new(1..=3, 1 << 20);
            let mut truth = Truth::default();
            for s in &steps {
                // Only flows the client opened send packets other than SYN.
                let live_or_syn = match s {
                    Step::Packet(f, p) => *p == Packet::Syn || truth.open.contains_key(f),
                    _ => true,
                };
                if !live_or_syn {
                    continue;
                }
                match *s {
                    Step::Packet(f, p) => m.packet(f, p),
                    Step::Timeout(f) => m.expire(f),
                    Step::Evict(f) => m.evict(f),
                    Step::RemoveBackend(b) => m.remove_backend(b),
                    Step::AddBackend => {
                        m.add_backend();
                    }
                    Step::Collect => m.collect(),
                    Step::Restart => m.restart_agent(),
                }
                if let Step::Packet(f, p) = *s {
                    pod_answers(&mut m, &mut truth, f, p);
                }
                if let Step::Timeout(f) = *s
                    && !truth.open.contains_key(&f)
                {
                    continue;
                }
                truth.apply(s);
                prop_assert!(m.consistent(), "after {s:?}: {:?} vs {:?}", m.counts, m.registry);
            }
            // Quiesce: every live flow sends a packet (re-pinning it if its
            // entry was evicted or its backend left), then the collector runs.
            if m.active.is_empty() {
                m.add_backend();
            }
            let live: Vec<Flow> = truth.open.keys().copied().collect();
            for f in live {
                m.packet(f, Packet::Data);
                pod_answers(&mut m, &mut truth, f, Packet::Data);
            }
            // Flows that ended while their conntrack state was lost (an
            // evicted entry misses the pod's FIN) are idle from now on: the
            // collector's idle timeout ends them, as it does on a node.
            for f in m.flows() {
                if !truth.open.contains_key(&f) {
                    m.expire(f);
                }
            }
            m.collect();
            prop_assert!(m.consistent());
            let mut want: BTreeMap<BackendId, u64> = BTreeMap::new();
            for &f in truth.open.keys() {
                // A live flow the datapath never counted (its first packet
                // found no backend) is pinned now, counted from here.
                let b = m.pinned(f).expect("a live flow is pinned");
                *want.entry(b).or_default() += 1;
            }
            let got: BTreeMap<BackendId, u64> =
                m.counts.iter().filter(|(_, n)| **n > 0).map(|(b, n)| (*b, *n)).collect();
            prop_assert_eq!(got, want);
            // Flows re-pinned while their key still held the evicted
            // flow's token were untracked by the datapath, then counted by
            // the collector: each live flow holds its own token.
            for &f in truth.open.keys() {
                prop_assert!(m.counted(f), "live flow {f} is counted under its own token");
            }
        }

        #[test]
        fn a_full_registry_never_corrupts_a_count(steps in proptest::collection::vec(step(), 1..120)) {
            let mut m = Model::new(1..=3, 3);
            for s in &steps {
                match *s {
                    Step::Packet(f, p) => m.packet(f, p),
                    Step::Timeout(f) => m.expire(f),
                    Step::Evict(f) => m.evict(f),
                    Step::RemoveBackend(b) => m.remove_backend(b),
                    Step::AddBackend => {
                        m.add_backend();
                    }
                    Step::Collect => m.collect(),
                    Step::Restart => m.restart_agent(),
                }
                prop_assert!(m.consistent());
                prop_assert!(m.registry.len() <= 3);
            }
        }
    }
}
