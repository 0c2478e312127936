//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`; and the
//! `healthCheckNodePort` servers of `externalTrafficPolicy: Local`
//! LoadBalancer services, answered the way kube-proxy answers them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{metrics::Metrics, model::Desired};

/// State shared with the HTTP handlers.
pub struct Shared {
    /// Metrics to encode.
    pub metrics: Metrics,
    /// Set after the first full sync.
    pub ready: AtomicBool,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is
/// dropped.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<JoinHandle<()>> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server: {e}");
        }
    }))
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first full sync\n",
        )
    }
}

/// What one health-check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HealthState {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// The running `healthCheckNodePort` servers.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, (Arc<RwLock<HealthState>>, JoinHandle<()>)>,
}

impl HealthChecks {
    /// Starts, updates and stops servers so that each `healthCheckNodePort`
    /// of `desired` answers with its service's count of ready local
    /// endpoints.
    pub async fn update(&mut self, desired: &Desired) {
        let mut want: BTreeMap<u16, HealthState> = BTreeMap::new();
        let mut endpoints: BTreeMap<u16, std::collections::BTreeSet<std::net::Ipv4Addr>> =
            BTreeMap::new();
        for (name, sp) in &desired.services {
            let Some(port) = sp.health_check_node_port else {
                continue;
            };
            want.entry(port).or_insert_with(|| HealthState {
                namespace: name.namespace.clone(),
                name: name.name.clone(),
                local_endpoints: 0,
            });
            endpoints
                .entry(port)
                .or_default()
                .extend(sp.ready_local_backends().map(|b| b.addr));
        }
        for (port, eps) in endpoints {
            if let Some(w) = want.get_mut(&port) {
                w.local_endpoints = eps.len();
            }
        }
        self.servers.retain(|port, (_, task)| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health-check port closed");
            }
            keep
        });
        for (port, state) in want {
            if let Some((shared, _)) = self.servers.get(&port) {
                if let Ok(mut s) = shared.write() {
                    *s = state;
                }
                continue;
            }
            let shared = Arc::new(RwLock::new(state));
            let app = Router::new()
                .fallback(get(health_check))
                .with_state(shared.clone());
            match tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await {
                Ok(listener) => {
                    info!(port, "health-check port open");
                    let task = tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    });
                    self.servers.insert(port, (shared, task));
                }
                Err(e) => warn!(port, "cannot open health-check port: {e}"),
            }
        }
    }
}

/// kube-proxy's answer: 200 with the local endpoint count when there is one,
/// 503 otherwise.
async fn health_check(State(s): State<Arc<RwLock<HealthState>>>) -> impl IntoResponse {
    let s = s.read().map(|s| s.clone()).unwrap_or(HealthState {
        namespace: String::new(),
        name: String::new(),
        local_endpoints: 0,
    });
    let body = serde_json::json!({
        "service": { "namespace": s.namespace, "name": s.name },
        "localEndpoints": s.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if s.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
}
