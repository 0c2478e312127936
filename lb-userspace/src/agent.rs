//! The agent's main loop: one pipeline from objects to maps.
//!
//! ```text
//! manifests ─load─▶ Objects ─translate─▶ Desired ─plan(current)─▶ [Op] ─apply─▶ maps
//! ```
//!
//! On start the pinned maps are read back, so a restarted agent plans
//! against what the datapath really holds and keeps service and backend ids.

use std::{collections::BTreeSet, net::Ipv4Addr};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    cli::RunArgs,
    error::{Error, Result},
    loader::{Datapath, LoadOptions},
    plan::{PlanConfig, plan},
    source::manifests,
    translate::{NodeContext, translate},
    writer::{MapState, MapWriter, kernel::KernelMaps},
};

/// The IPv4 addresses of `ifaces` (NodePorts are served on each).
pub fn interface_addrs(ifaces: &[String]) -> Result<Vec<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| Error::Datapath(format!("listing interface addresses: {e}")))?;
    let mut out = BTreeSet::new();
    for a in addrs {
        if !ifaces.contains(&a.interface_name) {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            out.insert(sin.ip());
        }
    }
    for i in ifaces {
        if nix::net::if_::if_nametoindex(i.as_str()).is_err() {
            return Err(Error::Datapath(format!("no interface named {i}")));
        }
    }
    Ok(out.into_iter().collect())
}

/// Reads, translates, plans and applies once. Returns the number of
/// operations written.
pub fn sync(
    args: &RunArgs,
    node: &NodeContext,
    cfg: &PlanConfig,
    maps: &mut KernelMaps,
    current: &mut MapState,
    warned: &mut BTreeSet<String>,
) -> Result<usize> {
    let objects = manifests::load(&args.manifests)?;
    let tr = translate(&objects, node)?;
    for w in tr.warnings {
        if warned.insert(w.clone()) {
            warn!("{w}");
        }
    }
    let ops = plan(current, &tr.desired, cfg)?;
    let applied = maps.apply(&ops);
    if let Err(e) = applied {
        // Part of the plan may be in the maps: read them back before the next try.
        *current = maps.read_state()?;
        return Err(e);
    }
    for op in &ops {
        current.apply_op(op);
    }
    info!(
        services = tr.desired.services.len(),
        frontends = current.frontends.len(),
        backends = current.backends.len(),
        ops = ops.len(),
        "synced"
    );
    Ok(ops.len())
}

/// `lb-agent run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = PlanConfig {
        maglev_size: args.maglev_table_size,
    };
    let node = NodeContext {
        node_name: args.node_name.clone(),
        node_addrs: interface_addrs(&args.interfaces)?,
    };
    info!(node = %node.node_name, addrs = ?node.node_addrs, "node addresses");
    // Validate the manifests before touching the kernel.
    let objects = manifests::load(&args.manifests)?;
    translate(&objects, &node)?;

    let mut dp = Datapath::load(&LoadOptions {
        bpffs_root: args.bpffs_root.clone(),
        ct_capacity: args.conntrack_capacity,
    })?;
    info!(pins = %dp.pin_dir.display(), "datapath loaded");
    let mut maps = KernelMaps::from_ebpf(&mut dp.ebpf)?;
    let mut current = maps.read_state()?;
    let mut warned = BTreeSet::new();
    sync(&args, &node, &cfg, &mut maps, &mut current, &mut warned)?;
    for iface in &args.interfaces {
        if let Err(e) = dp.attach(iface) {
            dp.detach_all();
            return Err(e.into());
        }
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!(manifests = %args.manifests.display(), "SIGHUP: reloading");
                if let Err(e) = sync(&args, &node, &cfg, &mut maps, &mut current, &mut warned) {
                    error!("reload rejected, keeping the last good state: {e}");
                }
            }
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
        }
    }
    dp.detach_all();
    info!("stopped; maps stay pinned under {}", dp.pin_dir.display());
    Ok(())
}
