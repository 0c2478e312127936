//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`,
//! `/skipped`; and the `healthCheckNodePort` servers of
//! `externalTrafficPolicy: Local` LoadBalancer services, answered the way
//! kube-proxy answers them.
//!
//! Every server runs on [`HttpRuntime`], a runtime on its own thread: a
//! scrape (which reads per-CPU maps) or a flood of connections never takes
//! the thread that syncs the maps and runs the watchers, and a long sync
//! never delays a health check. Each server takes at most
//! [`HttpLimits::max_connections`] connections at once (further ones wait
//! in the kernel's accept queue), closes a connection idle for
//! [`HttpLimits::idle_timeout`] and answers 503 to a request not answered
//! within [`HttpLimits::request_timeout`].

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
    time::{Instant, Sleep},
};
use tracing::{info, warn};

use crate::{metrics::Metrics, model::Desired, translate::Skipped};

/// State shared with the HTTP handlers.
pub struct Shared {
    /// Metrics to encode.
    pub metrics: Metrics,
    /// Set after the first full sync.
    pub ready: AtomicBool,
    /// What the last sync left out, and why (`/skipped`).
    pub skipped: RwLock<Vec<Skipped>>,
}

impl Shared {
    /// Not ready, nothing skipped.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            ready: AtomicBool::new(false),
            skipped: RwLock::new(Vec::new()),
        }
    }
}

/// Limits that apply to each HTTP server of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// A connection that neither sends nor receives anything for this long
    /// (no request, half a request, an unread answer) is closed.
    pub idle_timeout: Duration,
    /// A request not answered in this time gets a 503.
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    /// 64 connections, 30 s idle, 10 s per request.
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A tokio runtime on its own thread that runs every HTTP server of the
/// agent. Dropping it stops them.
pub struct HttpRuntime {
    spawner: Spawner,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts servers on the [`HttpRuntime`].
#[derive(Clone)]
struct Spawner {
    handle: Handle,
    limits: HttpLimits,
}

impl HttpRuntime {
    /// Starts the thread `http` and its runtime.
    pub fn start(limits: HttpLimits) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                // Returns when the sender is dropped; dropping the runtime
                // then stops every server.
                let _ = rt.block_on(stopped);
            })?;
        Ok(Self {
            spawner: Spawner { handle, limits },
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Serves `/metrics`, `/healthz`, `/readyz` and `/skipped` on `addr`
    /// (port 0: any free port); returns the bound address.
    pub fn serve(&self, addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/skipped", get(skipped))
            .with_state(shared);
        let listener = std::net::TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        self.spawner.serve(listener, app, "metrics")?;
        info!(addr = %bound, "serving /metrics, /healthz, /readyz, /skipped");
        Ok(bound)
    }

    /// Health-check servers that run on this runtime.
    pub fn health_checks(&self) -> HealthChecks {
        HealthChecks {
            spawner: self.spawner.clone(),
            servers: BTreeMap::new(),
        }
    }
}

impl Drop for HttpRuntime {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Spawner {
    /// Serves `app` on `listener` with the limits, on the HTTP runtime.
    fn serve(
        &self,
        listener: std::net::TcpListener,
        app: Router,
        what: &'static str,
    ) -> std::io::Result<JoinHandle<()>> {
        listener.set_nonblocking(true)?;
        let _in_runtime = self.handle.enter();
        let listener = LimitedListener {
            inner: TcpListener::from_std(listener)?,
            permits: Arc::new(Semaphore::new(self.limits.max_connections)),
            idle: self.limits.idle_timeout,
        };
        let app = app.layer(middleware::from_fn_with_state(
            self.limits.request_timeout,
            with_timeout,
        ));
        Ok(self.handle.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!("{what} server: {e}");
            }
        }))
    }
}

/// Answers 503 when the handler takes longer than the request timeout.
async fn with_timeout(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timed out\n").into_response(),
    }
}

/// A listener that accepts a connection only when one of its
/// `max_connections` slots is free; the slot comes back when the
/// connection closes.
struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Waiting here rather than accepting and closing leaves further
        // clients in the kernel's accept queue: they are served in turn.
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed; without a slot, wait forever.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let deadline = Box::pin(tokio::time::sleep(self.idle));
                    let io = LimitedIo {
                        io,
                        _permit: permit,
                        idle: self.idle,
                        deadline,
                    };
                    return (io, addr);
                }
                // Out of file descriptors, a connection reset before accept:
                // try again a little later.
                Err(e) => {
                    warn!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that holds its listener's slot and fails once no byte has
/// moved either way for the idle timeout.
struct LimitedIo {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl LimitedIo {
    /// What a pending read or write returns: `Pending` until the deadline,
    /// then a timeout error (hyper closes the connection).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed(&mut self) {
        let at = Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.pending(cx),
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Encoding reads every per-CPU counter map: it runs on the blocking pool,
/// not on the thread that answers health checks.
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    match tokio::task::spawn_blocking(move || s.metrics.encode()).await {
        Ok(text) => (
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
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

/// What the last sync left out: a JSON list of
/// `{reason, part, object, file?, field, message, servicePorts}`.
async fn skipped(State(s): State<Arc<Shared>>) -> Response {
    let list = s.skipped.read().map(|l| l.clone()).unwrap_or_default();
    match serde_json::to_string_pretty(&list) {
        Ok(body) => ([("content-type", "application/json")], body + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// What one health-check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HealthState {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// The running `healthCheckNodePort` servers (made by
/// [`HttpRuntime::health_checks`]).
pub struct HealthChecks {
    spawner: Spawner,
    servers: BTreeMap<u16, (Arc<RwLock<HealthState>>, JoinHandle<()>)>,
}

impl HealthChecks {
    /// Starts, updates and stops servers so that each `healthCheckNodePort`
    /// of `desired` answers with its service's count of ready local
    /// endpoints.
    pub fn update(&mut self, desired: &Desired) {
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
            let served = std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
                .and_then(|l| self.spawner.serve(l, app, "health-check"));
            match served {
                Ok(task) => {
                    info!(port, "health-check port open");
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
