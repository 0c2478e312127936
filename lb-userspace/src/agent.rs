//! The agent's main loop: one pipeline from objects to maps.
//!
//! ```text
//! manifests | Kubernetes ─▶ Objects ─translate─▶ Desired ─plan(current)─▶ [Op] ─apply─▶ maps
//! ```
//!
//! Sources say which Services changed ([`Scope`]); only those are
//! translated and planned again ([`crate::incremental`],
//! [`crate::plan::plan_changes`]). Everything is translated and planned
//! from scratch on start, after a failed write, and every
//! `--full-resync-interval` as a safety net.
//!
//! On start the pinned maps are read back, so a restarted agent plans
//! against what the datapath really holds, keeps service and backend ids,
//! and (attached through pinned links) never leaves the interface without
//! a program. With Kubernetes, nothing is planned before every watched kind
//! has been listed once. Objects that cannot be balanced are left out and
//! reported, never a reason to stop syncing the others; a sync whose map
//! writes fail is tried again with a [`Backoff`].

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    cli::RunArgs,
    error::{Error, Result},
    health::{HealthChecks, HttpLimits, HttpRuntime, Shared},
    incremental::{Changed, DesiredState, Scope},
    loader::{Datapath, LoadOptions},
    metrics::{Metrics, Names, ReasonLabel, ResultLabel, StateLabel},
    plan::{PlanConfig, plan, plan_changes},
    source::{Objects, kube::KubeSource, manifests},
    translate::{NodeContext, SkipReason, Skipped, TranslateOptions},
    writer::{MapState, MapWriter, kernel::KernelMaps},
};

/// The IPv4 addresses of `ifaces` (NodePorts are served on each).
pub fn interface_addrs(ifaces: &[String]) -> Result<Vec<Ipv4Addr>> {
    for i in ifaces {
        if nix::net::if_::if_nametoindex(i.as_str()).is_err() {
            return Err(Error::Datapath(format!("no interface named {i}")));
        }
    }
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| Error::Datapath(format!("listing interface addresses: {e}")))?;
    let out: BTreeSet<Ipv4Addr> = addrs
        .filter(|a| ifaces.contains(&a.interface_name))
        .filter_map(|a| a.address.as_ref()?.as_sockaddr_in().map(|s| s.ip()))
        .collect();
    Ok(out.into_iter().collect())
}

/// Every IPv4 address of this host, on any interface (externalIPs equal to
/// one of them are refused unless allowed).
pub fn host_addrs() -> Result<BTreeSet<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| Error::Datapath(format!("listing interface addresses: {e}")))?;
    Ok(addrs
        .filter_map(|a| a.address.as_ref()?.as_sockaddr_in().map(|s| s.ip()))
        .collect())
}

/// Everything one sync needs and updates. `W` is the map writer: the
/// pinned maps in the agent, [`crate::writer::memory::MemoryMaps`] in tests.
pub struct Pipeline<W = KernelMaps> {
    cfg: PlanConfig,
    maps: W,
    current: MapState,
    state: DesiredState,
    /// The maps may not hold what the last plan says (first sync, failed
    /// write): the next sync plans everything.
    plan_all: bool,
    warned: BTreeSet<String>,
    shared: Arc<Shared>,
    health_checks: HealthChecks,
}

impl<W: MapWriter> Pipeline<W> {
    /// A pipeline that plans against what `maps` hold now.
    pub fn new(
        node: NodeContext,
        opts: TranslateOptions,
        cfg: PlanConfig,
        maps: W,
        shared: Arc<Shared>,
        health_checks: HealthChecks,
    ) -> Result<Self> {
        let current = maps.read_state()?;
        Ok(Self {
            cfg,
            maps,
            current,
            state: DesiredState::new(node, opts),
            plan_all: true,
            warned: BTreeSet::new(),
            shared,
            health_checks,
        })
    }

    /// The maps this pipeline writes.
    pub fn maps(&self) -> &W {
        &self.maps
    }

    /// The desired state of the last sync.
    pub fn desired(&self) -> &crate::model::Desired {
        self.state.desired()
    }

    /// Syncs every object from scratch: `objects` is the whole set.
    pub fn sync(&mut self, objects: &Objects) -> Result<usize> {
        self.update(&Scope::All, objects)
    }

    /// Translates the Services `scope` covers (`objects` holds every
    /// object in scope), plans against the maps and applies.
    /// Returns the number of operations written. Objects that cannot be
    /// balanced are left out, logged (once per message) and reported
    /// (`/skipped`, `lb_skipped_service_ports`); everything else is synced.
    /// Fails only when the maps cannot be written (the caller retries,
    /// and the next sync plans everything).
    pub fn update(&mut self, scope: &Scope, objects: &Objects) -> Result<usize> {
        let started = Instant::now();
        let r = self.sync_inner(scope, objects, started);
        let m = &self.shared.metrics;
        m.sync_seconds.observe(started.elapsed().as_secs_f64());
        let result = if r.is_ok() { "ok" } else { "error" };
        m.syncs.get_or_create(&ResultLabel { result }).inc();
        r
    }

    fn sync_inner(&mut self, scope: &Scope, objects: &Objects, started: Instant) -> Result<usize> {
        let changed = self.state.update(scope, objects);
        for w in self.state.warnings() {
            if !self.warned.contains(w) {
                warn!("{w}");
                self.warned.insert(w.clone());
            }
        }
        let skipped = self.state.skipped().to_vec();
        for s in &skipped {
            let line = format!("{s} ({}: left out)", s.reason.name());
            if self.warned.insert(line.clone()) {
                warn!("{line}");
            }
        }
        self.report_skipped(&skipped);
        let desired = self.state.desired();
        // Cannot fail on the objects: translation leaves out what would
        // conflict or not fit. An error here is a bug, reported as a failed sync.
        let full = self.plan_all || matches!(changed, Changed::All);
        let ops = match &changed {
            _ if full => plan(&self.current, desired, &self.cfg)?,
            Changed::Ports(before) => {
                let previous = crate::model::Desired {
                    services: before
                        .iter()
                        .filter_map(|(n, sp)| Some((n.clone(), sp.clone()?)))
                        .collect(),
                };
                let names = before.keys().cloned().collect();
                plan_changes(&self.current, desired, &previous, &names, &self.cfg)?
            }
            Changed::All => unreachable!("planned in full above"),
        };
        if let Err(e) = self.maps.apply(&ops) {
            // Part of the plan may be in the maps: read them back, and plan
            // everything next time.
            self.plan_all = true;
            self.current = self.maps.read_state()?;
            return Err(e);
        }
        self.plan_all = false;
        for op in &ops {
            self.current.apply_op(op);
        }
        let desired = self.state.desired();
        self.health_checks.update(desired);
        self.publish(desired, if full { None } else { Some(&ops[..]) });
        info!(
            services = desired.services.len(),
            skipped = skipped.len(),
            frontends = self.current.frontends.len(),
            backends = self.current.backends.len(),
            ops = ops.len(),
            full,
            ms = format!("{:.3}", started.elapsed().as_secs_f64() * 1e3),
            "synced"
        );
        Ok(ops.len())
    }

    /// `lb_skipped_service_ports{reason}` (distinct service ports per
    /// reason) and the `/skipped` list.
    fn report_skipped(&self, skipped: &[Skipped]) {
        for reason in SkipReason::ALL {
            let ports: BTreeSet<&String> = skipped
                .iter()
                .filter(|s| s.reason == reason)
                .flat_map(|s| &s.service_ports)
                .collect();
            let label = ReasonLabel {
                reason: reason.name(),
            };
            self.shared
                .metrics
                .skipped
                .get_or_create(&label)
                .set(ports.len() as i64);
        }
        if let Ok(mut list) = self.shared.skipped.write() {
            *list = skipped.to_vec();
        }
    }

    /// Updates the gauges and the collector's names: from the whole state
    /// after a full plan, from `ops` alone after a partial one.
    fn publish(&self, desired: &crate::model::Desired, ops: Option<&[crate::writer::Op]>) {
        let m = &self.shared.metrics;
        let c = &self.current;
        m.services.set(c.service_count() as i64);
        m.frontends.set(c.frontends.len() as i64);
        let (active, terminating) = c.backend_states();
        for (state, n) in [("active", active), ("terminating", terminating)] {
            m.backends
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        if let Ok(mut names) = m.names.write() {
            match ops {
                None => *names = Names::of(desired, c),
                Some(ops) => names.apply(ops, c),
            }
        }
    }
}

/// When to try a failed sync again: 100 ms after the first failure,
/// doubling up to 10 s; a success starts over.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling to 10 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// `first` after the first failure, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max,
        }
    }

    /// The wait before the next try, after one more failure.
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// A success: the next failure waits `first` again.
    pub fn succeeded(&mut self) {
        self.next = self.first;
    }
}

/// Starts the garbage collector of the conntrack and NAT tables on its own
/// thread (it only reads and deletes map entries).
fn spawn_gc(pin_dir: &std::path::Path, args: &RunArgs, shared: Arc<Shared>) -> Result<()> {
    let closer = crate::loader::FlowCloser::open(&LoadOptions {
        bpffs_root: args.bpffs_root.clone(),
        ct_capacity: args.conntrack_capacity,
    })?;
    let mut tables = crate::gc::Tables::open(pin_dir, Some(closer))?;
    let timeouts = crate::gc::Timeouts {
        udp_idle: Duration::from_secs(args.nat_udp_timeout),
        tcp_idle: Duration::from_secs(args.nat_tcp_idle_timeout),
        tcp_closed_grace: Duration::from_secs(args.nat_tcp_closed_grace),
        tcp_syn: Duration::from_secs(args.nat_tcp_syn_timeout),
    };
    let every = Duration::from_secs(args.gc_interval.max(1));
    std::thread::Builder::new()
        .name("gc".into())
        .spawn(move || {
            loop {
                let c = tables.collect(crate::gc::monotonic_ns(), &timeouts);
                let m = &shared.metrics;
                m.ct_entries.set(c.ct_entries as i64);
                m.nat_entries.set(c.nat_entries as i64);
                m.gc_removed.inc_by(c.flows_removed as u64);
                std::thread::sleep(every);
            }
        })
        .map_err(|e| Error::Datapath(format!("starting the garbage collector: {e}")))?;
    Ok(())
}

/// Every object, from the source (the last load of the manifests).
fn full_update(source: &Source, last_objects: &Option<Objects>) -> Option<(Scope, Objects)> {
    match source {
        Source::Kube(src, _) => src.snapshot().map(|o| (Scope::All, o)),
        Source::Manifests(_) => last_objects.clone().map(|o| (Scope::All, o)),
    }
}

/// Where objects come from.
enum Source {
    Manifests(std::path::PathBuf),
    Kube(KubeSource, tokio::sync::mpsc::Receiver<()>),
}

/// `lb-agent run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = PlanConfig {
        maglev_size: args.maglev_table_size,
    };
    cfg.validate()?;
    let node = NodeContext {
        node_name: args.node_name.clone(),
        node_addrs: interface_addrs(&args.interfaces)?,
    };
    info!(node = %node.node_name, addrs = ?node.node_addrs, "node addresses");
    let opts = TranslateOptions {
        allow_external_ip_node_address: args.allow_external_ip_node_address,
        other_node_addrs: host_addrs()?,
        ..Default::default()
    };

    // Read before touching the kernel: a file that does not parse stops the
    // start; objects that do not translate are left out and reported by the
    // first sync (which uses these objects: the file is read once).
    let mut first_objects = None;
    let mut source = match &args.manifests {
        Some(path) => {
            first_objects = Some(manifests::load(path)?);
            Source::Manifests(path.clone())
        }
        None => {
            let client = crate::source::kube::client(args.kubeconfig.as_deref()).await?;
            let (src, rx) = KubeSource::start(client, &node.node_name);
            Source::Kube(src, rx)
        }
    };

    let mut dp = Datapath::load(&LoadOptions {
        bpffs_root: args.bpffs_root.clone(),
        ct_capacity: args.conntrack_capacity,
    })?;
    info!(pins = %dp.pin_dir.display(), "datapath loaded");
    let snat_addr = args
        .snat_address
        .or_else(|| node.node_addrs.first().copied())
        .ok_or_else(|| {
            Error::Config("no IPv4 address on the interfaces for SNAT; pass --snat-address".into())
        })?;
    let (lo, hi) = args.snat_port_range;
    dp.configure(&lb_common::DatapathConfig {
        snat_addr: snat_addr.octets(),
        snat_port_lo: lo,
        snat_port_hi: hi,
    })?;
    info!(%snat_addr, ports = %format!("{lo}-{hi}"), "forwarding to other nodes with SNAT");
    let maps = KernelMaps::from_ebpf(&mut dp.ebpf)?;
    let shared = Arc::new(Shared::new(Metrics::new(dp.pin_dir.clone())));
    // The HTTP servers run on their own thread: see `health`.
    let http = HttpRuntime::start(HttpLimits::default())?;
    match args.metrics_addr.as_str() {
        "off" => {}
        a => {
            let addr: SocketAddr = a
                .parse()
                .map_err(|e| Error::Config(format!("--metrics-addr {a}: {e}")))?;
            http.serve(addr, shared.clone())?;
        }
    }
    let mut pipeline = Pipeline::new(node, opts, cfg, maps, shared.clone(), http.health_checks())?;
    if !pipeline.current.frontends.is_empty() {
        info!(
            frontends = pipeline.current.frontends.len(),
            backends = pipeline.current.backends.len(),
            "serving what the pinned maps hold until the first full sync"
        );
    }

    spawn_gc(&dp.pin_dir, &args, shared.clone())?;

    // Attach first: with pinned links a restart replaces the programs
    // atomically and keeps serving the pinned state while we sync.
    for iface in &args.interfaces {
        match dp.attach(iface, args.attach) {
            Ok(hook) => shared.metrics.set_attached(iface, hook),
            Err(e) => {
                dp.detach_all();
                return Err(e.into());
            }
        }
    }
    // The objects of the last load of the manifests: what a reload is
    // compared with, and what a failed sync or a full resync uses (the
    // Kubernetes source hands out a fresh snapshot instead).
    let mut last_objects: Option<Objects> = None;
    let mut backoff = Backoff::default();
    let mut retry_at: Option<tokio::time::Instant> = None;
    if let Some(objects) = first_objects {
        match pipeline.sync(&objects) {
            Ok(_) => {
                shared.ready.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                let wait = backoff.failed();
                error!("sync failed, trying again in {wait:?}: {e}");
                retry_at = Some(tokio::time::Instant::now() + wait);
            }
        }
        last_objects = Some(objects);
    } else {
        info!("waiting for the initial list of Services, EndpointSlices and the Node");
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let resync_every = Duration::from_secs(args.full_resync_interval);
    let mut next_resync = tokio::time::Instant::now() + resync_every;
    loop {
        let kube_changed = async {
            match &mut source {
                Source::Kube(_, rx) => rx.recv().await,
                Source::Manifests(_) => std::future::pending().await,
            }
        };
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let resync = async {
            if resync_every.is_zero() {
                std::future::pending().await
            } else {
                tokio::time::sleep_until(next_resync).await
            }
        };
        // What to sync now, if anything.
        let update: Option<(Scope, Objects)> = tokio::select! {
            _ = hup.recv() => {
                let Source::Manifests(path) = &source else {
                    info!("SIGHUP ignored: the Kubernetes source needs no reload");
                    continue;
                };
                info!(manifests = %path.display(), "SIGHUP: reloading");
                match manifests::load(path) {
                    Ok(objects) => {
                        // Only the Services whose objects differ from the
                        // last load are translated and planned again.
                        let update = match &last_objects {
                            Some(old) => {
                                let keys = old.changed_services(&objects);
                                let only = objects.only(&keys);
                                (Scope::Services(keys), only)
                            }
                            None => (Scope::All, objects.clone()),
                        };
                        last_objects = Some(objects);
                        Some(update)
                    }
                    Err(e) => {
                        error!("reload rejected, keeping the last good state: {e}");
                        continue;
                    }
                }
            }
            Some(()) = kube_changed => {
                let Source::Kube(src, _) = &source else { continue };
                src.take_update()
            }
            () = retry => {
                retry_at = None;
                full_update(&source, &last_objects)
            }
            () = resync => {
                next_resync = tokio::time::Instant::now() + resync_every;
                info!("full resync");
                full_update(&source, &last_objects)
            }
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
        };
        let Some((scope, objects)) = update else {
            continue;
        };
        match pipeline.update(&scope, &objects) {
            Ok(_) => {
                backoff.succeeded();
                retry_at = None;
                if !shared.ready.swap(true, Ordering::Relaxed) {
                    info!("first full sync done: ready");
                }
            }
            Err(e) => {
                // The maps may hold part of the plan: try again soon, not
                // only at the next change.
                let wait = backoff.failed();
                error!("sync failed, trying again in {wait:?}: {e}");
                retry_at = Some(tokio::time::Instant::now() + wait);
            }
        }
    }
    if args.keep_datapath_on_exit {
        dp.keep_attached();
        info!("stopped; programs stay attached and maps pinned");
    } else {
        dp.detach_all();
        info!("stopped; maps stay pinned under {}", dp.pin_dir.display());
    }
    drop(http);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100_ms_to_10_s_and_starts_over_after_a_success() {
        let mut b = Backoff::default();
        let waits: Vec<u128> = (0..9).map(|_| b.failed().as_millis()).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(100));
    }
}
