//! The HTTP side: routing, list, get and watch handlers, and the `Status`
//! error bodies, over hyper's HTTP/1.1 server.

use std::{convert::Infallible, pin::Pin, sync::Arc, task, time::Duration};

use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    Options,
    selector::{FieldSelector, LabelSelector},
    store::{Event, EventType, Expired, Kind, Snapshot, Store},
};

/// A watch without `timeoutSeconds` ends after this long (the API server
/// picks between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Encoded watch events buffered per stream before the producer waits.
const WATCH_BUFFER: usize = 64;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What every connection's handlers share.
pub(crate) struct Context {
    pub(crate) store: Store,
    pub(crate) options: Options,
}

/// Accepts connections until the runtime running it is dropped.
pub(crate) async fn serve(listener: TcpListener, context: Arc<Context>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or a connection reset before
                // accept: wait a little rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // The API server (Go's net/http) disables Nagle's algorithm; with it
        // on, a watch event written while the client delays its ACK of the
        // previous chunk waits up to 40 ms.
        let _ = stream.set_nodelay(true);
        let context = context.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = handle(&context, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            // A client going away mid-response is not an error of ours.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The resource a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `/version`.
    Version,
    /// A collection, in one namespace or all.
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    /// One object.
    Object {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
}

fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api", "v1", rest @ ..] => ("v1", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io/v1", rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.api_version() == group && k.plural() == plural)?;
    let valid = match (kind.namespaced(), namespace.is_some(), name.is_some()) {
        // Namespaced kinds have no cluster-wide single-object path.
        (true, false, true) => false,
        // Cluster-scoped kinds have no namespaced paths.
        (false, true, _) => false,
        _ => true,
    };
    if !valid {
        return None;
    }
    if namespace.is_some_and(str::is_empty) || name.is_some_and(str::is_empty) {
        return None;
    }
    let namespace = namespace.map(str::to_owned);
    Some(match name {
        None => Route::Collection { kind, namespace },
        Some(name) => Route::Object {
            kind,
            namespace,
            name: name.to_owned(),
        },
    })
}

/// Decoded query parameters (last occurrence wins).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean parameter as Go's `strconv.ParseBool` reads it.
    fn flag(&self, key: &str) -> Result<Option<bool>, Failure> {
        match self.get(key) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False" | "") => Ok(Some(false)),
            Some(other) => Err(bad_request(&format!("invalid boolean {key}={other:?}"))),
        }
    }

    fn selectors(&self) -> Result<(LabelSelector, FieldSelector), Failure> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or(""))
            .map_err(|e| bad_request(&e))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or(""))
            .map_err(|e| bad_request(&e))?;
        Ok((labels, fields))
    }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space; a `%`
/// not followed by two hex digits is kept as is).
fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some((hi, lo)), _) => {
                // Two hex digits: the value fits a byte.
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(context: &Context, request: &Request<Incoming>) -> Response<Body> {
    respond(context, request).unwrap_or_else(Failure::into_response)
}

fn respond(context: &Context, request: &Request<Incoming>) -> Result<Response<Body>, Failure> {
    if request.method() != Method::GET {
        return Err(Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the API-server double is read-only: change objects through its Store",
        ));
    }
    let query = Query::parse(request.uri().query());
    let watch = query.flag("watch")?.unwrap_or(false);
    match route(request.uri().path()) {
        Some(Route::Version) => Ok(json_response(StatusCode::OK, &version())),
        Some(Route::Collection { kind, namespace }) if watch => {
            watch_collection(context, kind, namespace.as_deref(), &query)
        }
        Some(Route::Collection { kind, namespace }) => {
            list(&context.store, kind, namespace.as_deref(), &query)
        }
        Some(Route::Object { .. }) if watch => Err(bad_request(
            "watching a single object's path is not supported by the double; \
             watch the collection with fieldSelector=metadata.name=NAME",
        )),
        Some(Route::Object {
            kind,
            namespace,
            name,
        }) => match context
            .store
            .get_value(kind, namespace.as_deref().unwrap_or(""), &name)
        {
            Some(object) => Ok(json_response(StatusCode::OK, &object)),
            None => Err(not_found(kind, &name)),
        },
        None => Err(Failure::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// How a list should treat `resourceVersion` and `resourceVersionMatch`.
fn check_list_version(query: &Query, current: u64) -> Result<(), Failure> {
    let rv = query.get("resourceVersion").filter(|rv| !rv.is_empty());
    let version_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let Some(rv) = rv else {
        return match version_match {
            None => Ok(()),
            Some(_) => Err(bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            )),
        };
    };
    let requested = parse_rv(rv)?;
    match version_match {
        // Unset and NotOlderThan: any state at least as new as requested.
        None | Some("NotOlderThan") if requested > current => {
            Err(too_large_resource_version(requested, current))
        }
        None | Some("NotOlderThan") => Ok(()),
        Some("Exact") if requested == 0 => Err(bad_request(
            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
        )),
        // Only the current state is kept; older states are "compacted".
        Some("Exact") if requested == current => Ok(()),
        Some("Exact") if requested > current => Err(too_large_resource_version(requested, current)),
        Some("Exact") => Err(expired(&format!(
            "too old resource version: {requested} ({current})"
        ))),
        Some(other) => Err(bad_request(&format!(
            "unsupported resourceVersionMatch {other:?}"
        ))),
    }
}

fn parse_rv(rv: &str) -> Result<u64, Failure> {
    rv.parse()
        .map_err(|_| bad_request(&format!("invalid resource version {rv:?}")))
}

fn list(
    store: &Store,
    kind: Kind,
    namespace: Option<&str>,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    store.count_list(kind);
    let (labels, fields) = query.selectors()?;
    let limit = match query.get("limit").filter(|l| !l.is_empty()) {
        None => None,
        Some(text) => match text.parse::<usize>() {
            Ok(0) => None,
            Ok(limit) => Some(limit),
            Err(_) => return Err(bad_request(&format!("invalid limit {text:?}"))),
        },
    };

    let (snapshot, id, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            if query
                .get("resourceVersion")
                .is_some_and(|rv| !rv.is_empty())
            {
                return Err(bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let Some((id, offset)) = parse_continue(token) else {
                return Err(bad_request(&format!("invalid continue token {token:?}")));
            };
            match store.snapshot(id) {
                Some(snapshot) if snapshot.kind == kind => (snapshot, id, offset),
                Some(_) => return Err(bad_request("continue token is for another resource")),
                None => {
                    return Err(expired(
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ));
                }
            }
        }
        None => {
            check_list_version(query, store.resource_version())?;
            let (rv, items) = store.select(kind, namespace, &labels, &fields);
            let snapshot = Arc::new(Snapshot {
                kind,
                rv,
                items,
                count_remaining: labels.is_empty() && fields.is_empty(),
            });
            (snapshot, 0, 0)
        }
    };

    let end = limit.map_or(snapshot.items.len(), |l| {
        offset.saturating_add(l).min(snapshot.items.len())
    });
    let page = snapshot.items.get(offset..end).unwrap_or_default();
    let mut metadata = json!({"resourceVersion": snapshot.rv.to_string()});
    if end < snapshot.items.len() {
        // First page of a longer list: keep the snapshot for the next pages.
        let id = if id == 0 {
            store.keep_snapshot(Snapshot {
                kind,
                rv: snapshot.rv,
                items: snapshot.items.clone(),
                count_remaining: snapshot.count_remaining,
            })
        } else {
            id
        };
        metadata["continue"] = Value::from(format!("{id}:{end}"));
        if snapshot.count_remaining {
            metadata["remainingItemCount"] = Value::from(snapshot.items.len() - end);
        }
    }
    let items: Vec<Value> = page.iter().map(|object| list_item(object)).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": metadata,
            "items": items,
        }),
    ))
}

/// An object as a list item: the API server leaves out `apiVersion` and
/// `kind` there (kubernetes/kubernetes#3030); clients fill them in.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

fn parse_continue(token: &str) -> Option<(u64, usize)> {
    let (id, offset) = token.split_once(':')?;
    Some((id.parse().ok()?, offset.parse().ok()?))
}

/// Where a watch starts.
enum WatchStart {
    /// Synthetic ADDED events for the current state, then changes; with
    /// `initial_end_bookmark`, a bookmark annotated
    /// `k8s.io/initial-events-end` after them (streaming lists).
    CurrentState { initial_end_bookmark: bool },
    /// Changes after the current state, without the state itself.
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

/// What a watch filters on.
struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The event this watcher sees for `event`, if any: an object that
    /// starts matching is ADDED, one that stops matching is DELETED (its
    /// previous state, at the event's resourceVersion).
    fn view(&self, event: &Event) -> Option<(EventType, Value)> {
        let now = self.matches(&event.object);
        let before = event.prev.as_deref().is_some_and(|p| self.matches(p));
        match event.ty {
            EventType::Added if now => Some((EventType::Added, (*event.object).clone())),
            EventType::Deleted if now => Some((EventType::Deleted, (*event.object).clone())),
            EventType::Modified if now && before => {
                Some((EventType::Modified, (*event.object).clone()))
            }
            EventType::Modified if now => Some((EventType::Added, (*event.object).clone())),
            EventType::Modified if before => {
                let mut gone = event.prev.as_deref().cloned().unwrap_or(Value::Null);
                if let Some(metadata) = gone.get_mut("metadata").and_then(Value::as_object_mut) {
                    metadata.insert("resourceVersion".into(), Value::from(event.rv.to_string()));
                }
                Some((EventType::Deleted, gone))
            }
            _ => None,
        }
    }
}

fn watch_collection(
    context: &Context,
    kind: Kind,
    namespace: Option<&str>,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let store = &context.store;
    let active = store.count_watch(kind);
    let (labels, fields) = query.selectors()?;
    let bookmarks = query.flag("allowWatchBookmarks")?.unwrap_or(false);
    let send_initial_events = query.flag("sendInitialEvents")?;
    let timeout = match query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(text) => match text.parse::<u64>() {
            Ok(0) => DEFAULT_WATCH_TIMEOUT,
            Ok(seconds) => Duration::from_secs(seconds),
            Err(_) => return Err(bad_request(&format!("invalid timeoutSeconds {text:?}"))),
        },
    };
    let rv = query.get("resourceVersion").filter(|rv| !rv.is_empty());
    let version_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let current = store.resource_version();
    let requested = rv.map(parse_rv).transpose()?;
    if let Some(requested) = requested.filter(|r| *r > current) {
        return Err(too_large_resource_version(requested, current));
    }
    let start = match send_initial_events {
        Some(true) => {
            if version_match != Some("NotOlderThan") {
                return Err(bad_request(
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !bookmarks {
                return Err(bad_request(
                    "sendInitialEvents requires allowWatchBookmarks=true",
                ));
            }
            WatchStart::CurrentState {
                initial_end_bookmark: true,
            }
        }
        _ if version_match.is_some() => {
            return Err(bad_request(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        Some(false) => match requested {
            None | Some(0) => WatchStart::Now,
            Some(rv) => WatchStart::After(rv),
        },
        None => match requested {
            None | Some(0) => WatchStart::CurrentState {
                initial_end_bookmark: false,
            },
            Some(rv) => WatchStart::After(rv),
        },
    };
    let filter = Filter {
        namespace: namespace.map(str::to_owned),
        labels,
        fields,
    };
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    // Subscribe now, before the response goes out, so that no change or
    // bookmark request made after the client has the stream goes unseen.
    let mut changes = store.subscribe_changes();
    let mut bookmark_requests = store.subscribe_bookmarks();
    changes.borrow_and_update();
    bookmark_requests.borrow_and_update();
    let stream = WatchStream {
        store: store.clone(),
        changes,
        bookmark_requests,
        kind,
        filter,
        bookmarks,
        bookmark_interval: context.options.bookmark_interval,
        deadline: Instant::now() + timeout,
        tx,
    };
    tokio::spawn(async move {
        let _active = active;
        stream.run(start).await;
    });
    let body = WatchBody { rx }.boxed_unsync();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .unwrap_or_else(|_| internal_error()))
}

/// The producer side of one watch response.
struct WatchStream {
    store: Store,
    /// Wakes the stream on every mutation of the store.
    changes: watch::Receiver<u64>,
    /// Wakes the stream on [`Store::bookmark_now`].
    bookmark_requests: watch::Receiver<u64>,
    kind: Kind,
    filter: Filter,
    bookmarks: bool,
    bookmark_interval: Duration,
    deadline: Instant,
    tx: mpsc::Sender<Bytes>,
}

impl WatchStream {
    async fn run(mut self, start: WatchStart) {
        let mut cursor = match start {
            WatchStart::CurrentState {
                initial_end_bookmark,
            } => {
                let (rv, objects) = self.store.select(
                    self.kind,
                    self.filter.namespace.as_deref(),
                    &self.filter.labels,
                    &self.filter.fields,
                );
                for object in objects {
                    if !self.send(EventType::Added.as_str(), &object).await {
                        return;
                    }
                }
                if initial_end_bookmark && !self.send_bookmark(rv, true).await {
                    return;
                }
                rv
            }
            WatchStart::Now => self.store.resource_version(),
            WatchStart::After(rv) => rv,
        };

        let period = self.bookmark_interval.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bookmark_due = false;
        loop {
            match self.store.events_since(self.kind, cursor) {
                Ok((events, next)) => {
                    for event in &events {
                        if let Some((ty, object)) = self.filter.view(event)
                            && !self.send(ty.as_str(), &object).await
                        {
                            return;
                        }
                    }
                    cursor = next;
                }
                Err(Expired) => {
                    let status = expired(&format!("too old resource version: {cursor}"));
                    self.send("ERROR", &status.0).await;
                    return;
                }
            }
            if bookmark_due {
                bookmark_due = false;
                if !self.send_bookmark(cursor, false).await {
                    return;
                }
            }
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = ticker.tick(), if self.bookmarks => bookmark_due = true,
                requested = self.bookmark_requests.changed(), if self.bookmarks => {
                    if requested.is_err() {
                        return;
                    }
                    bookmark_due = true;
                }
                () = tokio::time::sleep_until(self.deadline) => return,
                () = self.tx.closed() => return,
            }
        }
    }

    /// Sends one event line; false once the client is gone.
    async fn send(&self, ty: &str, object: &Value) -> bool {
        let mut line =
            serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    async fn send_bookmark(&self, rv: u64, initial_events_end: bool) -> bool {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({
            "apiVersion": self.kind.api_version(),
            "kind": self.kind.kind(),
            "metadata": metadata,
        });
        self.send("BOOKMARK", &object).await
    }
}

/// A streaming response body fed by a [`WatchStream`]; it ends (with the
/// terminating chunk) when the producer drops its sender.
struct WatchBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "gitVersion": "v1.35.0-apiserver-double",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed_unsync())
        .unwrap_or_else(|_| internal_error())
}

fn internal_error() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

/// A request the double refuses: a `meta/v1` `Status` object, sent with
/// its `code` as the HTTP status (or inside a watch `ERROR` event).
pub(crate) struct Failure(Value);

impl Failure {
    fn new(code: StatusCode, reason: &str, message: &str) -> Self {
        Self(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }))
    }

    fn with_details(mut self, details: Value) -> Self {
        self.0["details"] = details;
        self
    }

    fn into_response(self) -> Response<Body> {
        let code = self.0["code"]
            .as_u64()
            .and_then(|code| StatusCode::from_u16(u16::try_from(code).ok()?).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.0)
    }
}

fn bad_request(message: &str) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn expired(message: &str) -> Failure {
    Failure::new(StatusCode::GONE, "Expired", message)
}

fn not_found(kind: Kind, name: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} {name:?} not found", kind.plural()),
    )
    .with_details(json!({"name": name, "kind": kind.plural()}))
}

/// What the API server answers (after waiting ~3 s, which the double does
/// not) when asked for a resourceVersion it has not reached.
fn too_large_resource_version(requested: u64, current: u64) -> Failure {
    Failure::new(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        &format!("Too large resource version: {requested}, current: {current}"),
    )
    .with_details(json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_api_paths() {
        let collection = |kind, ns: Option<&str>| {
            Some(Route::Collection {
                kind,
                namespace: ns.map(str::to_owned),
            })
        };
        assert_eq!(route("/api/v1/services"), collection(Kind::Service, None));
        assert_eq!(
            route("/api/v1/namespaces/a/services"),
            collection(Kind::Service, Some("a"))
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/endpointslices"),
            collection(Kind::EndpointSlice, None)
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/b/endpointslices"),
            collection(Kind::EndpointSlice, Some("b"))
        );
        assert_eq!(route("/api/v1/nodes"), collection(Kind::Node, None));
        assert_eq!(
            route("/api/v1/nodes/n1"),
            Some(Route::Object {
                kind: Kind::Node,
                namespace: None,
                name: "n1".into()
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/a/services/web"),
            Some(Route::Object {
                kind: Kind::Service,
                namespace: Some("a".into()),
                name: "web".into()
            })
        );
        for missing in [
            "/api/v1/services/web",
            "/api/v1/namespaces/a/nodes",
            "/api/v1/endpointslices",
            "/apis/discovery.k8s.io/v1/services",
            "/api/v1/pods",
            "/api",
            "/",
        ] {
            assert_eq!(route(missing), None, "{missing}");
        }
    }

    #[test]
    fn query_values_are_form_decoded() {
        let query = Query::parse(Some("labelSelector=app%3Dweb%2C%21canary&x=a+b&y=%zz"));
        assert_eq!(query.get("labelSelector"), Some("app=web,!canary"));
        assert_eq!(query.get("x"), Some("a b"));
        assert_eq!(query.get("y"), Some("%zz"));
        assert_eq!(query.get("z"), None);
    }
}
