//! The agent's main loop: one pipeline from objects to maps.
//!
//! ```text
//! manifests | Kubernetes ─▶ Objects ─translate─▶ Desired ─plan(current)─▶ [Op] ─apply─▶ maps
//! ```
//!
//! On start the pinned maps are read back, so a restarted agent plans
//! against what the datapath really holds, keeps service and backend ids,
//! and (attached through pinned links) never leaves the interface without
//! a program. With Kubernetes, nothing is planned before every watched kind
//! has been listed once.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    cli::RunArgs,
    error::{Error, Result},
    health::{self, HealthChecks, Shared},
    loader::{Datapath, LoadOptions},
    metrics::{Metrics, Names, ResultLabel, StateLabel},
    plan::{PlanConfig, plan},
    source::{Objects, kube::KubeSource, manifests},
    translate::{NodeContext, translate},
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

/// Everything one sync needs and updates.
pub struct Pipeline {
    node: NodeContext,
    cfg: PlanConfig,
    maps: KernelMaps,
    current: MapState,
    warned: BTreeSet<String>,
    shared: Arc<Shared>,
    health_checks: HealthChecks,
}

impl Pipeline {
    /// Translates `objects`, plans against the maps and applies. Returns the
    /// number of operations written.
    pub async fn sync(&mut self, objects: &Objects) -> Result<usize> {
        let started = Instant::now();
        let r = self.sync_inner(objects).await;
        let m = &self.shared.metrics;
        m.sync_seconds.observe(started.elapsed().as_secs_f64());
        let result = if r.is_ok() { "ok" } else { "error" };
        m.syncs.get_or_create(&ResultLabel { result }).inc();
        r
    }

    async fn sync_inner(&mut self, objects: &Objects) -> Result<usize> {
        let tr = translate(objects, &self.node)?;
        for w in tr.warnings {
            if self.warned.insert(w.clone()) {
                warn!("{w}");
            }
        }
        let ops = plan(&self.current, &tr.desired, &self.cfg)?;
        if let Err(e) = self.maps.apply(&ops) {
            // Part of the plan may be in the maps: read them back before the next try.
            self.current = self.maps.read_state()?;
            return Err(e);
        }
        for op in &ops {
            self.current.apply_op(op);
        }
        self.health_checks.update(&tr.desired).await;
        self.publish(&tr.desired);
        info!(
            services = tr.desired.services.len(),
            frontends = self.current.frontends.len(),
            backends = self.current.backends.len(),
            ops = ops.len(),
            "synced"
        );
        Ok(ops.len())
    }

    fn publish(&self, desired: &crate::model::Desired) {
        let m = &self.shared.metrics;
        let c = &self.current;
        m.services.set(
            c.maglev.len().max(
                c.frontends
                    .values()
                    .map(|v| v.service_id)
                    .collect::<BTreeSet<_>>()
                    .len(),
            ) as i64,
        );
        m.frontends.set(c.frontends.len() as i64);
        for (state, code) in [
            ("active", lb_common::BACKEND_ACTIVE),
            ("terminating", lb_common::BACKEND_TERMINATING),
        ] {
            let n = c.backends.values().filter(|b| b.state == code).count();
            m.backends
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        if let Ok(mut names) = m.names.write() {
            *names = Names::of(desired, c);
        }
    }
}

/// Starts the garbage collector of the conntrack and NAT tables on its own
/// thread (it only reads and deletes map entries).
fn spawn_gc(pin_dir: &std::path::Path, args: &RunArgs, shared: Arc<Shared>) -> Result<()> {
    use std::time::Duration;
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

/// Where objects come from.
enum Source {
    Manifests(std::path::PathBuf),
    Kube(KubeSource, tokio::sync::mpsc::Receiver<()>),
}

/// `lb-agent run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = PlanConfig::new(args.maglev_table_size)?;
    let node = NodeContext {
        node_name: args.node_name.clone(),
        node_addrs: interface_addrs(&args.interfaces)?,
    };
    info!(node = %node.node_name, addrs = ?node.node_addrs, "node addresses");

    let mut source = match &args.manifests {
        Some(path) => {
            // Validate before touching the kernel.
            translate(&manifests::load(path)?, &node)?;
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
    let current = maps.read_state()?;
    if !current.frontends.is_empty() {
        info!(
            frontends = current.frontends.len(),
            backends = current.backends.len(),
            "serving what the pinned maps hold until the first full sync"
        );
    }
    let shared = Arc::new(Shared {
        metrics: Metrics::new(dp.pin_dir.clone()),
        ready: Default::default(),
    });
    let _http = match args.metrics_addr.as_str() {
        "off" => None,
        a => {
            let addr: SocketAddr = a
                .parse()
                .map_err(|e| Error::Config(format!("--metrics-addr {a}: {e}")))?;
            Some(health::serve(addr, shared.clone()).await?)
        }
    };
    let mut pipeline = Pipeline {
        node,
        cfg,
        maps,
        current,
        warned: BTreeSet::new(),
        shared: shared.clone(),
        health_checks: HealthChecks::default(),
    };

    spawn_gc(&dp.pin_dir, &args, shared.clone())?;

    // Attach first: with pinned links a restart replaces the programs
    // atomically and keeps serving the pinned state while we sync.
    for iface in &args.interfaces {
        if let Err(e) = dp.attach(iface) {
            dp.detach_all();
            return Err(e.into());
        }
    }
    if let Source::Manifests(path) = &source {
        let objects = manifests::load(path)?;
        pipeline.sync(&objects).await?;
        shared.ready.store(true, Ordering::Relaxed);
    } else {
        info!("waiting for the initial list of Services, EndpointSlices and the Node");
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let kube_changed = async {
            match &mut source {
                Source::Kube(_, rx) => rx.recv().await,
                Source::Manifests(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hup.recv() => {
                let Source::Manifests(path) = &source else {
                    info!("SIGHUP ignored: the Kubernetes source needs no reload");
                    continue;
                };
                info!(manifests = %path.display(), "SIGHUP: reloading");
                let r = match manifests::load(path) {
                    Ok(objects) => pipeline.sync(&objects).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    error!("reload rejected, keeping the last good state: {e}");
                }
            }
            Some(()) = kube_changed => {
                let Source::Kube(src, _) = &source else { continue };
                let Some(objects) = src.snapshot() else { continue };
                match pipeline.sync(&objects).await {
                    Ok(_) => {
                        if !shared.ready.swap(true, Ordering::Relaxed) {
                            info!("first full sync done: ready");
                        }
                    }
                    Err(e) => error!("sync failed, keeping the last good state: {e}"),
                }
            }
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
        }
    }
    if args.keep_datapath_on_exit {
        dp.keep_attached();
        info!("stopped; programs stay attached and maps pinned");
    } else {
        dp.detach_all();
        info!("stopped; maps stay pinned under {}", dp.pin_dir.display());
    }
    Ok(())
}
