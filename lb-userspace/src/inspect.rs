//! `lb-agent flows` and `lb-agent backends`: what the datapath holds,
//! read from the pinned maps of the node (so they work while the agent is
//! down, like bpftool).
//!
//! * A flow is listed while it is counted open (its token in
//!   `LB_OPEN_FLOWS_V4`), with its conntrack entry (`LB_CT_V4`) for the
//!   details: client, frontend, backend, protocol, TCP state, age, idle time
//!   and why that backend.
//! * A backend is listed with its service (`LB_SVC_NAMES`), state, open
//!   flows (`LB_BE_OPEN`) and counters (`LB_BE_COUNTERS`). A backend the
//!   agent removed but that still has open flows is listed as `removed`.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use aya::maps::{Array, HashMap};
use lb_common::{
    BACKEND_FREE, BACKEND_TERMINATING, BackendCounters, BackendV4, CT_TCP_ACK, CT_TCP_FIN_FWD,
    CT_TCP_FIN_REPLY, CT_TCP_RST, CT_TCP_SYN, CtKeyV4, CtValueV4, FrontendKeyV4, IPPROTO_TCP,
    NatValueV4, OpenFlowV4, REASON_AFFINITY, REASON_LEAST_CONN, REASON_MAGLEV, REASON_REBALANCED,
    REASON_ROUND_ROBIN, REASON_TERMINATING_FALLBACK, SVC_F_TERMINATING_FALLBACK, ServiceName,
    ServiceValue, flow, pin, token_backend, token_live,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    pinned,
};

/// One open flow.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    /// `ip:port` of the client.
    pub client: String,
    /// `ip:port` the client connected to.
    pub frontend: String,
    /// `ip:port` of the pod.
    pub backend: String,
    /// Service port, `ns/name[:port]`.
    pub service: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// TCP: `open`, `fin-client`, `fin-pod`, `closed`, `reset`; UDP: `-`.
    pub state: String,
    /// Seconds since the flow was pinned.
    pub age_s: u64,
    /// Seconds since its last packet (1 s resolution).
    pub idle_s: u64,
    /// Why this backend: `maglev`, `round-robin`, `least-connection`,
    /// `affinity`, `terminating-fallback`, `rebalanced`.
    pub reason: String,
    /// The reason's detail (`CtValueV4::choice`): Maglev slot,
    /// round-robin turn, open flows seen by least-connection.
    pub choice: u32,
}

/// One backend.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    /// Backend id.
    pub id: u32,
    /// Service port, `ns/name[:port]`.
    pub service: String,
    /// `ip:port`.
    pub backend: String,
    /// `ready` (takes new flows), `serving` (terminating, taking new flows
    /// because no endpoint is ready), `terminating` (keeps its flows, gets
    /// no new one), `removed` (gone from the service, flows still open).
    pub state: String,
    /// Flows open on it on this node.
    pub open_flows: u64,
    /// Packets balanced to it (forward direction).
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// The name of a `REASON_*` code.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        REASON_MAGLEV => "maglev",
        REASON_REBALANCED => "rebalanced",
        REASON_AFFINITY => "affinity",
        REASON_ROUND_ROBIN => "round-robin",
        REASON_LEAST_CONN => "least-connection",
        REASON_TERMINATING_FALLBACK => "terminating-fallback",
        _ => "unknown",
    }
}

/// The TCP state shown for combined flags of both directions.
pub fn tcp_state(flags: u8) -> &'static str {
    let fin = flags & (CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY);
    if flags & CT_TCP_RST != 0 {
        "reset"
    } else if fin == CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY {
        "closed"
    } else if fin == CT_TCP_FIN_FWD {
        "fin-client"
    } else if fin == CT_TCP_FIN_REPLY {
        "fin-pod"
    } else if flags & CT_TCP_SYN != 0 && flags & CT_TCP_ACK == 0 {
        "handshake"
    } else if flags & CT_TCP_SYN != 0 {
        "open"
    } else {
        "open (mid-stream)"
    }
}

fn endpoint(addr: [u8; 4], port_be: u16) -> String {
    format!("{}:{}", Ipv4Addr::from(addr), u16::from_be(port_be))
}

/// The pinned maps the tools read.
pub struct Pinned {
    dir: std::path::PathBuf,
}

impl Pinned {
    /// The maps pinned under `<bpffs_root>/v<MAP_VERSION>`.
    pub fn new(bpffs_root: &Path) -> Self {
        Self {
            dir: crate::loader::pin_dir(bpffs_root),
        }
    }

    fn names(&self) -> Result<BTreeMap<u32, String>> {
        let m: HashMap<_, u32, ServiceName> = pinned::hash(&self.dir, pin::SERVICE_NAMES)?;
        Ok(m.iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k, v.as_str().to_owned()))
            .collect())
    }

    fn service_flags(&self) -> Result<BTreeMap<u32, u16>> {
        let m: HashMap<_, FrontendKeyV4, ServiceValue> =
            pinned::hash(&self.dir, pin::FRONTENDS_V4)?;
        Ok(m.iter()
            .filter_map(|r| r.ok())
            .map(|(_, v)| (v.service_id, v.flags))
            .collect())
    }

    /// Open flows of backend ids, from `LB_BE_OPEN`.
    pub fn open_counts(&self, ids: impl IntoIterator<Item = u32>) -> Result<BTreeMap<u32, u64>> {
        let m: Array<_, u64> = pinned::array(&self.dir, pin::BACKEND_OPEN_FLOWS)?;
        Ok(ids
            .into_iter()
            .map(|id| (id, m.get(&id, 0).unwrap_or(0)))
            .collect())
    }

    /// Every open flow, as listed by `lb-agent flows`.
    pub fn flows(&self, now_ns: u64) -> Result<Vec<FlowRow>> {
        let names = self.names()?;
        let reg: HashMap<_, CtKeyV4, OpenFlowV4> = pinned::hash(&self.dir, pin::OPEN_FLOWS_V4)?;
        let ct: HashMap<_, CtKeyV4, CtValueV4> = pinned::hash(&self.dir, pin::CONNTRACK_V4)?;
        let nat: HashMap<_, CtKeyV4, NatValueV4> = pinned::hash(&self.dir, pin::NAT_V4)?;
        let backends: Array<_, BackendV4> = pinned::array(&self.dir, pin::BACKENDS_V4)?;
        let secs = |ns: u64| Duration::from_nanos(now_ns.saturating_sub(ns)).as_secs();
        let mut rows = Vec::new();
        // Closed entries (waiting for reuse or the collector) are not flows.
        for (k, f) in reg
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| token_live(f.open))
        {
            let v = ct.get(&k, 0).ok();
            let (backend, state, age, idle, reason, choice) = match v {
                Some(v) => {
                    // The pod's side: the reply entry of a local flow, the
                    // NAT mapping of a forwarded one.
                    let partner = flow::partner_key(&k, &v);
                    let r = if v.forwarded() {
                        nat.get(&partner, 0)
                            .ok()
                            .map(|n| (n.tcp_flags, n.last_seen_ns))
                    } else {
                        ct.get(&partner, 0)
                            .ok()
                            .map(|r| (r.tcp_flags, r.last_seen_ns))
                    };
                    let flags = v.tcp_flags | r.map_or(0, |r| r.0);
                    let last = v.last_seen_ns.max(r.map_or(0, |r| r.1));
                    (
                        endpoint(v.nat_addr, v.nat_port_be),
                        if k.proto == IPPROTO_TCP {
                            tcp_state(flags).to_owned()
                        } else {
                            "-".to_owned()
                        },
                        secs(v.created_ns),
                        secs(last),
                        reason_name(v.reason).to_owned(),
                        v.choice,
                    )
                }
                None => {
                    let b = backends.get(&token_backend(f.open), 0).unwrap_or_default();
                    (
                        endpoint(b.addr, b.port_be),
                        "no conntrack entry".to_owned(),
                        secs(f.created_ns),
                        secs(f.created_ns),
                        "unknown".to_owned(),
                        0,
                    )
                }
            };
            rows.push(FlowRow {
                client: endpoint(k.src_addr, k.src_port_be),
                frontend: endpoint(k.dst_addr, k.dst_port_be),
                backend,
                service: names
                    .get(&f.service_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", f.service_id)),
                protocol: if k.proto == IPPROTO_TCP { "TCP" } else { "UDP" }.to_owned(),
                state,
                age_s: age,
                idle_s: idle,
                reason,
                choice,
            });
        }
        rows.sort_by(|a, b| {
            (&a.service, &a.backend, &a.client).cmp(&(&b.service, &b.backend, &b.client))
        });
        Ok(rows)
    }

    /// Every backend, as listed by `lb-agent backends`.
    pub fn backends(&self) -> Result<Vec<BackendRow>> {
        let names = self.names()?;
        let flags = self.service_flags()?;
        let backends: Array<_, BackendV4> = pinned::array(&self.dir, pin::BACKENDS_V4)?;
        let open: Array<_, u64> = pinned::array(&self.dir, pin::BACKEND_OPEN_FLOWS)?;
        let counters: Array<_, BackendCounters> = pinned::array(&self.dir, pin::BACKEND_COUNTERS)?;
        let mut rows = Vec::new();
        for (id, b) in backends.iter().enumerate() {
            let Ok(b) = b else { continue };
            let id = id as u32;
            let open_flows = open.get(&id, 0).unwrap_or(0);
            if b.state == BACKEND_FREE && (open_flows == 0 || b.addr == [0; 4]) {
                continue;
            }
            let state = match b.state {
                BACKEND_FREE => "removed",
                BACKEND_TERMINATING => "terminating",
                _ if flags
                    .get(&b.service_id)
                    .is_some_and(|f| f & SVC_F_TERMINATING_FALLBACK != 0) =>
                {
                    "serving"
                }
                _ => "ready",
            };
            let c = counters.get(&id, 0).unwrap_or_default();
            rows.push(BackendRow {
                id,
                service: names
                    .get(&b.service_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", b.service_id)),
                backend: endpoint(b.addr, b.port_be),
                state: state.to_owned(),
                open_flows,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        rows.sort_by(|a, b| (&a.service, &a.backend).cmp(&(&b.service, &b.backend)));
        Ok(rows)
    }
}

/// Whether service name `name` (`ns/name[:port]`) matches the filter
/// `ns/name` (every port) or `ns/name:port`.
pub fn service_matches(name: &str, filter: &str) -> bool {
    name == filter
        || name
            .strip_prefix(filter)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// Whether backend `ip:port` matches the filter `ip` or `ip:port`.
pub fn backend_matches(backend: &str, filter: &str) -> bool {
    backend == filter || backend.split(':').next() == Some(filter)
}

/// Renders rows as an aligned text table with `headers`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `lb-agent flows`.
pub fn print_flows(
    root: &Path,
    service: Option<&str>,
    backend: Option<&str>,
    json: bool,
) -> Result<String> {
    let rows: Vec<FlowRow> = Pinned::new(root)
        .flows(crate::gc::monotonic_ns())?
        .into_iter()
        .filter(|r| service.is_none_or(|s| service_matches(&r.service, s)))
        .filter(|r| backend.is_none_or(|b| backend_matches(&r.backend, b)))
        .collect();
    if json {
        return serde_json::to_string_pretty(&rows).map_err(|e| Error::Datapath(e.to_string()));
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.client.clone(),
                r.frontend.clone(),
                r.backend.clone(),
                r.service.clone(),
                r.protocol.clone(),
                r.state.clone(),
                format!("{}s", r.age_s),
                format!("{}s", r.idle_s),
                match r.reason.as_str() {
                    "maglev" => format!("maglev (slot {})", r.choice),
                    "round-robin" => format!("round-robin (turn {})", r.choice),
                    "least-connection" => format!("least-connection ({} open)", r.choice),
                    other => other.to_owned(),
                },
            ]
        })
        .collect();
    Ok(table(
        &[
            "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "PROTO", "STATE", "AGE", "IDLE", "REASON",
        ],
        &cells,
    ))
}

/// `lb-agent backends`.
pub fn print_backends(root: &Path, service: Option<&str>, json: bool) -> Result<String> {
    let rows: Vec<BackendRow> = Pinned::new(root)
        .backends()?
        .into_iter()
        .filter(|r| service.is_none_or(|s| service_matches(&r.service, s)))
        .collect();
    if json {
        return serde_json::to_string_pretty(&rows).map_err(|e| Error::Datapath(e.to_string()));
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.backend.clone(),
                r.state.clone(),
                r.open_flows.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    Ok(table(
        &[
            "SERVICE",
            "BACKEND",
            "STATE",
            "OPEN FLOWS",
            "PACKETS",
            "BYTES",
        ],
        &cells,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_states() {
        assert!(service_matches("demo/echo:http", "demo/echo"));
        assert!(service_matches("demo/echo", "demo/echo"));
        assert!(!service_matches("demo/echo2", "demo/echo"));
        assert!(service_matches("demo/echo:http", "demo/echo:http"));
        assert!(backend_matches("198.18.1.11:8080", "198.18.1.11"));
        assert!(!backend_matches("198.18.1.111:8080", "198.18.1.11"));
        assert_eq!(tcp_state(CT_TCP_SYN), "handshake");
        assert_eq!(tcp_state(CT_TCP_SYN | CT_TCP_ACK), "open");
        assert_eq!(tcp_state(CT_TCP_SYN | CT_TCP_FIN_FWD), "fin-client");
        assert_eq!(tcp_state(CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY), "closed");
        assert_eq!(tcp_state(CT_TCP_RST), "reset");
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }
}
