//! An API-server double: a local plain-HTTP server speaking the Kubernetes
//! list/watch protocol for the three kinds the agent reads — v1 `Service`,
//! `discovery.k8s.io/v1` `EndpointSlice` and v1 `Node` — so that tests and
//! benchmarks can run the real kube-rs client (`watcher`, `reflector`)
//! without a cluster.
//!
//! ```no_run
//! use k8s_openapi::api::core::v1::Service;
//! use lb_testkit::apiserver::{ApiServer, Kind};
//!
//! let mut server = ApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
//! server.write_kubeconfig("/tmp/kubeconfig".as_ref()).unwrap();
//! let mut web = Service::default();
//! web.metadata.name = Some("web".into());
//! server.store().apply(&web).unwrap(); // namespace "default", resourceVersion "1"
//! // ... the client lists and watches http://127.0.0.1:PORT ...
//! server.stop(); // every connection closes
//! server.store().expire_history(); // watches resuming from before get 410
//! server.restart().unwrap(); // same port, same objects
//! assert!(server.store().list_requests(Kind::Service) > 0);
//! ```
//!
//! # What it does
//! - `GET` on `/api/v1/services`, `/api/v1/namespaces/{ns}/services`,
//!   `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`,
//!   `/api/v1/nodes`, the single-object paths below them, and `/version`.
//!   Errors are `Status` objects with the API server's codes and reasons.
//! - Lists (`ServiceList`, …) carry the current global resourceVersion;
//!   items leave out `apiVersion`/`kind` as the real server does.
//!   `limit` + `continue` paginate a snapshot taken by the first page (the
//!   last 16 snapshots are kept; older tokens get 410 Expired).
//!   `resourceVersion` + `resourceVersionMatch` (`NotOlderThan`, `Exact`)
//!   are checked against the current version: only the current state
//!   exists, so an `Exact` older version is 410 Expired, and a version not
//!   reached yet is 504 "Too large resource version" at once (the real
//!   server first waits ~3 s).
//! - `labelSelector` (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
//!   `a notin (x)`) and `fieldSelector` (`metadata.name`,
//!   `metadata.namespace` with `=`, `==`, `!=`) on lists and watches.
//! - Watches (`watch=1`/`true`): a chunked `application/json` stream, one
//!   `WatchEvent` per line. Without `resourceVersion` (or with `0`) the
//!   current state comes first as ADDED events; with `resourceVersion=N`,
//!   every event after N from the history (the last
//!   [`DEFAULT_HISTORY_LIMIT`] per kind, or [`Store::with_history_limit`]);
//!   N older than the history is an `ERROR` event with a 410 `Expired`
//!   `Status`, as is a watcher that falls that far behind. An object that
//!   starts or stops matching a watch's selectors is sent as ADDED or
//!   DELETED, as the API server's watch cache does. `allowWatchBookmarks`
//!   gives BOOKMARK events every [`Options::bookmark_interval`] and on
//!   [`Store::bookmark_now`]; `timeoutSeconds` ends the stream (30 min when
//!   absent); `sendInitialEvents=true` (streaming lists) sends the state
//!   and a bookmark annotated `k8s.io/initial-events-end`.
//! - [`ApiServer::stop`] (and drop) closes the listener and every open
//!   connection at once, so clients see the server vanish mid-watch;
//!   [`ApiServer::restart`] binds the same address again over the same
//!   [`Store`].
//!
//! # What it does not do
//! - No writes over HTTP (POST/PUT/PATCH/DELETE get 405): tests change
//!   objects through [`Store`]. No admission, defaulting or validation
//!   beyond `apiVersion`/`kind`/`metadata.name`; no `generation`,
//!   `managedFields`, finalizers or graceful deletion; no optimistic
//!   concurrency (`apply` always wins).
//! - No TLS, authentication or authorization; no discovery (`/api`,
//!   `/apis`), OpenAPI, `/healthz`; no protobuf, table or
//!   partial-object-metadata responses (JSON only, whatever `Accept` says);
//!   no HTTP/2; no deprecated `/watch/` paths and no watch on a single
//!   object's path (use `fieldSelector=metadata.name=`).
//! - Field selectors other than `metadata.name`/`metadata.namespace`
//!   (e.g. `spec.clusterIP`) are refused with 400. Label keys and values
//!   are checked for their alphabet and length only.
//! - On `continue` pages, the selectors of the first page apply (the real
//!   server requires the client to repeat them). Old states are not kept:
//!   lists are always served at the current version.
//! - Unknown query parameters (`pretty`, `timeoutSeconds` on a list, …) are
//!   ignored.

mod http;
pub mod selector;
mod store;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::Path,
    sync::Arc,
    thread,
    time::Duration,
};

pub use self::store::{DEFAULT_HISTORY_LIMIT, Error, Kind, Served, Store};

/// Server settings that do not belong to the store.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often a watch that allowed bookmarks gets one (default 1 s).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// A running (or stopped) API-server double on a fixed address.
#[derive(Debug)]
pub struct ApiServer {
    store: Store,
    options: Options,
    addr: SocketAddr,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl ApiServer {
    /// Starts a server over a new, empty [`Store`] on `addr` (port 0 picks
    /// one; [`ApiServer::addr`] tells which).
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        Self::start_with(Store::new(), addr, Options::default())
    }

    /// Starts a server over `store` on `addr`. The listening socket is
    /// created on the calling thread, hence in its network namespace; the
    /// server then runs on its own thread with its own tokio runtime.
    pub fn start_with(store: Store, addr: SocketAddr, options: Options) -> io::Result<Self> {
        let mut server = Self {
            store,
            options,
            addr,
            running: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// The address the server listens on (the real port, after port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL clients should use (`http://127.0.0.1:PORT`; an
    /// unspecified address is replaced by loopback).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The store the server serves (shared: mutate it to produce events).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the server is accepting connections.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops the server: the listener and every open connection (watches
    /// included) are closed when this returns. Idempotent.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // The thread drops its runtime, and with it every socket, as
            // soon as it sees the signal (or the sender dropped).
            let _ = running.shutdown.send(());
            let _ = running.thread.join();
        }
    }

    /// Starts the server again on the same address over the same store
    /// (stopping it first if it runs). Like [`ApiServer::start_with`], the
    /// socket is created in the calling thread's network namespace.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let listener = TcpListener::bind(self.addr)?;
        listener.set_nonblocking(true)?;
        self.addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let context = Arc::new(http::Context {
            store: self.store.clone(),
            options: self.options.clone(),
        });
        let thread = thread::Builder::new()
            .name(format!("apiserver-{}", self.addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    // Inside the runtime: tokio needs its reactor here.
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = http::serve(listener, context) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task.
                drop(runtime);
            })?;
        self.running = Some(Running { shutdown, thread });
        Ok(())
    }

    /// A kubeconfig for this server: plain HTTP, no credentials, context
    /// `apiserver-double`, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: apiserver-double
  cluster:
    server: {url}
contexts:
- name: apiserver-double
  context:
    cluster: apiserver-double
    user: apiserver-double
    namespace: default
current-context: apiserver-double
users:
- name: apiserver-double
  user: {{}}
preferences: {{}}
",
            url = self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
