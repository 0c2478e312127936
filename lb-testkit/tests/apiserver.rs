//! The API-server double (`lb_testkit::apiserver`) against the real kube client:
//! lists, selectors, pagination, watcher + reflector on each kind, the
//! "server disappears and comes back with expired history" path, bookmarks,
//! streaming lists and watch timeouts. Loopback only; no root needed.

use std::{collections::BTreeMap, fmt::Debug, future::Future, ops::Deref, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use lb_testkit::apiserver::{ApiServer, Kind, Options, Store};
use serde::de::DeserializeOwned;

/// How long any one expected change may take to reach a client.
const BOUND: Duration = Duration::from_secs(2);

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..ObjectMeta::default()
    }
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)], port: i32) -> Service {
    Service {
        metadata: meta(Some(namespace), name, labels),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            name,
            &[("kubernetes.io/service-name", service)],
        ),
        address_type: "IPv4".into(),
        endpoints: Some(
            addresses
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![(*a).to_owned()],
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: None,
    }
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: meta(None, name, labels),
        ..Node::default()
    }
}

fn client(server: &ApiServer) -> Client {
    let url = server.url().parse().expect("server URL is a URI");
    Client::try_from(Config::new(url)).expect("kube client")
}

/// The sorted names of `objects` (`&K` from a list, `Arc<K>` from a reflector).
fn names<K: Resource>(objects: impl IntoIterator<Item = impl Deref<Target = K>>) -> Vec<String> {
    let mut names: Vec<String> = objects
        .into_iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect();
    names.sort();
    names
}

/// Polls `condition` every 10 ms until it holds; panics after `bound`.
async fn eventually(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + bound;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {bound:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `future`, panicking after `bound`.
async fn within<T>(what: &str, bound: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(bound, future)
        .await
        .unwrap_or_else(|_| panic!("not within {bound:?}: {what}"))
}

/// A reflector over `api` driven by a background task (with kube's default
/// backoff, as the agent runs it); the task ends with the test's runtime.
async fn reflect<K>(api: Api<K>, config: watcher::Config) -> reflector::Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(stream.for_each(|_| async {}));
    within("reflector ready", BOUND, reader.wait_until_ready())
        .await
        .expect("writer alive");
    reader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_return_applied_objects_and_honour_selectors() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let store = server.store();
    store
        .apply(&service("prod", "web", &[("app", "web")], 80))
        .unwrap();
    store
        .apply(&service(
            "prod",
            "db",
            &[("app", "db"), ("tier", "back")],
            5432,
        ))
        .unwrap();
    store
        .apply(&service(
            "dev",
            "web",
            &[("app", "web"), ("canary", "yes")],
            8080,
        ))
        .unwrap();
    store
        .apply(&slice("prod", "web-a", "web", &["10.0.0.1"]))
        .unwrap();
    store
        .apply(&slice("prod", "db-a", "db", &["10.0.0.2"]))
        .unwrap();
    store.apply(&node("node-a", &[("zone", "a")])).unwrap();
    store.apply(&node("node-b", &[("zone", "b")])).unwrap();
    let client = client(&server);

    let all: Api<Service> = Api::all(client.clone());
    let list = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(&list.items), ["db", "web", "web"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(store.resource_version().to_string())
    );
    assert_eq!(list.metadata.continue_, None);
    let web = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(web.items.len(), 2);
    let stable = ListParams::default().labels("app=web,!canary");
    let stable = all.list(&stable).await.unwrap();
    assert_eq!(stable.items.len(), 1);
    assert_eq!(stable.items[0].metadata.namespace.as_deref(), Some("prod"));
    let set = ListParams::default().labels("app in (db,cache),tier!=front");
    assert_eq!(names(&all.list(&set).await.unwrap().items), ["db"]);
    let by_field = ListParams::default().fields("metadata.namespace=dev");
    assert_eq!(all.list(&by_field).await.unwrap().items.len(), 1);

    let prod: Api<Service> = Api::namespaced(client.clone(), "prod");
    assert_eq!(
        names(&prod.list(&ListParams::default()).await.unwrap().items),
        ["db", "web"]
    );
    let got = prod.get("web").await.unwrap();
    assert_eq!(got.spec.unwrap().ports.unwrap()[0].port, 80);
    assert!(got.metadata.uid.is_some() && got.metadata.creation_timestamp.is_some());
    match prod.get("nope").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    match all
        .list(&ListParams::default().fields("spec.clusterIP=1.2.3.4"))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("expected 400, got {other:?}"),
    }

    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let for_web = ListParams::default().labels("kubernetes.io/service-name=web");
    let for_web = slices.list(&for_web).await.unwrap();
    assert_eq!(names(&for_web.items), ["web-a"]);
    assert_eq!(
        for_web.items[0].endpoints.as_ref().unwrap()[0].addresses,
        ["10.0.0.1"]
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let mine = ListParams::default().fields("metadata.name=node-b");
    assert_eq!(names(&nodes.list(&mine).await.unwrap().items), ["node-b"]);
    assert_eq!(
        nodes.get("node-a").await.unwrap().metadata.labels.unwrap()["zone"],
        "a"
    );

    // Pagination: every page at the first page's resourceVersion, even when
    // objects change between pages.
    let page1 = all.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page1.items.len(), 2);
    let token = page1.metadata.continue_.clone().expect("a continue token");
    assert_eq!(page1.metadata.remaining_item_count, Some(1));
    store.delete(Kind::Service, "prod", "web").unwrap();
    let page2 = ListParams::default().limit(2).continue_token(&token);
    let page2 = all.list(&page2).await.unwrap();
    assert_eq!(page2.items.len(), 1);
    assert_eq!(page2.metadata.continue_, None);
    assert_eq!(
        page1.metadata.resource_version,
        page2.metadata.resource_version
    );
    store.expire_history();
    match all
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(store.list_requests(Kind::Service) >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_works_with_the_kube_client() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    server.store().apply(&node("node-a", &[])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let nodes: Api<Node> = Api::all(client);
    assert_eq!(
        names(&nodes.list(&ListParams::default()).await.unwrap().items),
        ["node-a"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflectors_follow_every_kind() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let store = server.store().clone();
    store
        .apply(&service("prod", "web", &[("app", "web")], 80))
        .unwrap();
    store
        .apply(&slice("prod", "web-a", "web", &["10.0.0.1"]))
        .unwrap();
    store.apply(&node("node-a", &[])).unwrap();
    store.apply(&node("node-b", &[])).unwrap();
    let client = client(&server);

    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;
    let slices = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .await;
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields("metadata.name=node-a"),
    )
    .await;
    assert_eq!(names(services.state()), ["web"]);
    assert_eq!(names(slices.state()), ["web-a"]);
    assert_eq!(names(nodes.state()), ["node-a"]);

    // Add, modify, delete: each reaches the reflectors within the bound.
    store.apply(&service("dev", "api", &[], 81)).unwrap();
    store
        .apply(&slice("prod", "web-b", "web", &["10.0.0.3"]))
        .unwrap();
    eventually("service added", BOUND, || {
        names(services.state()) == ["api", "web"]
    })
    .await;
    eventually("slice added", BOUND, || {
        names(slices.state()) == ["web-a", "web-b"]
    })
    .await;

    store
        .apply(&service("prod", "web", &[("app", "web")], 8080))
        .unwrap();
    store
        .apply(&slice("prod", "web-a", "web", &["10.0.0.9"]))
        .unwrap();
    store.apply(&node("node-a", &[("ready", "yes")])).unwrap();
    store.apply(&node("node-b", &[("ready", "yes")])).unwrap();
    eventually("service modified", BOUND, || {
        services.state().iter().any(|s| {
            s.spec
                .as_ref()
                .and_then(|spec| spec.ports.as_ref())
                .unwrap()[0]
                .port
                == 8080
        })
    })
    .await;
    eventually("slice modified", BOUND, || {
        slices
            .state()
            .iter()
            .any(|s| s.endpoints.as_ref().unwrap()[0].addresses == ["10.0.0.9"])
    })
    .await;
    eventually("node modified", BOUND, || {
        nodes.state().iter().any(|n| n.metadata.labels.is_some())
    })
    .await;
    assert_eq!(names(nodes.state()), ["node-a"], "the field selector holds");

    store.delete(Kind::Service, "dev", "api").unwrap();
    store
        .delete_object::<EndpointSlice>("prod", "web-b")
        .unwrap();
    store.delete(Kind::Node, "", "node-a").unwrap();
    eventually("service deleted", BOUND, || {
        names(services.state()) == ["web"]
    })
    .await;
    eventually("slice deleted", BOUND, || {
        names(slices.state()) == ["web-a"]
    })
    .await;
    eventually("node deleted", BOUND, || nodes.state().is_empty()).await;

    // One list per kind: everything after came through the watches.
    for kind in Kind::ALL {
        assert_eq!(store.list_requests(kind), 1, "{kind:?}");
        assert_eq!(store.active_watches(kind), 1, "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_see_objects_enter_and_leave_their_selector() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let store = server.store().clone();
    store
        .apply(&service("prod", "web", &[("app", "web")], 80))
        .unwrap();
    let api = Api::<Service>::all(client(&server));
    let web = reflect(api, watcher::Config::default().labels("app=web")).await;
    assert_eq!(names(web.state()), ["web"]);

    store
        .apply(&service("prod", "web", &[("app", "old")], 80))
        .unwrap();
    eventually("left the selector", BOUND, || web.state().is_empty()).await;
    store
        .apply(&service("prod", "web", &[("app", "web")], 81))
        .unwrap();
    eventually("entered the selector", BOUND, || web.state().len() == 1).await;
    assert_eq!(store.list_requests(Kind::Service), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_recovers_when_the_server_returns_with_expired_history() {
    let mut server = ApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let store = server.store().clone();
    let addr = server.addr();
    store.apply(&service("prod", "web", &[], 80)).unwrap();
    store.apply(&service("prod", "db", &[], 5432)).unwrap();
    let services = reflect(
        Api::<Service>::all(client(&server)),
        watcher::Config::default(),
    )
    .await;
    eventually("watch open", BOUND, || {
        store.active_watches(Kind::Service) == 1
    })
    .await;
    let lists_before = store.list_requests(Kind::Service);

    // The server disappears; meanwhile objects change and the history the
    // client's resourceVersion points into is compacted away.
    server.stop();
    assert_eq!(
        store.active_watches(Kind::Service),
        0,
        "stop closes watches"
    );
    store.delete(Kind::Service, "prod", "db").unwrap();
    store.apply(&service("prod", "cache", &[], 6379)).unwrap();
    store.expire_history();
    server.restart().unwrap();
    assert_eq!(server.addr(), addr);

    // The watch resumes with its old resourceVersion, gets 410 Expired,
    // and the watcher re-lists (after kube's backoff, about a second).
    let bound = Duration::from_secs(10);
    eventually("reflector converged", bound, || {
        names(services.state()) == ["cache", "web"]
    })
    .await;
    assert!(
        store.list_requests(Kind::Service) > lists_before,
        "re-listed"
    );

    // And it keeps watching afterwards.
    store.apply(&service("prod", "db", &[], 5432)).unwrap();
    eventually("watching again", BOUND, || services.state().len() == 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watches_follow_the_protocol() {
    let options = Options {
        bookmark_interval: Duration::from_millis(100),
    };
    let server =
        ApiServer::start_with(Store::new(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let store = server.store().clone();
    store.apply(&node("node-a", &[])).unwrap();
    let nodes: Api<Node> = Api::all(client(&server));

    // Periodic bookmarks when allowed (kube allows them by default).
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(10), "0")
        .await
        .unwrap()
        .boxed();
    let first = within("first event", BOUND, stream.try_next())
        .await
        .unwrap();
    assert!(
        matches!(first, Some(WatchEvent::Added(n)) if n.metadata.name.as_deref() == Some("node-a"))
    );
    let bookmark = within("periodic bookmark", BOUND, stream.try_next())
        .await
        .unwrap();
    let Some(WatchEvent::Bookmark(bookmark)) = bookmark else {
        panic!("expected a bookmark, got {bookmark:?}");
    };
    assert_eq!(bookmark.types.kind, "Node");
    assert_eq!(
        bookmark.metadata.resource_version,
        store.resource_version().to_string()
    );

    // None when not allowed, even on demand; changes still come through.
    let rv = store.resource_version().to_string();
    let mut quiet = nodes
        .watch(&WatchParams::default().disable_bookmarks().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    store.bookmark_now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.apply(&node("node-b", &[])).unwrap();
    let next = within("an event", BOUND, quiet.try_next()).await.unwrap();
    assert!(matches!(next, Some(WatchEvent::Added(_))), "got {next:?}");

    // Resuming from before the history: one ERROR event with 410 Expired.
    store.expire_history();
    let mut gone = nodes
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match within("an error event", BOUND, gone.try_next())
        .await
        .unwrap()
    {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        within("end of stream", BOUND, gone.try_next())
            .await
            .unwrap()
            .is_none()
    );

    // timeoutSeconds closes the stream.
    let rv = store.resource_version().to_string();
    let mut short = nodes
        .watch(&WatchParams::default().disable_bookmarks().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let end = within("timeout", Duration::from_secs(3), short.try_next()).await;
    assert!(matches!(end, Ok(None)), "got {end:?}");
    assert!(store.watch_requests(Kind::Node) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_bookmarks_and_streaming_lists() {
    // A long interval: only bookmark_now() makes one.
    let options = Options {
        bookmark_interval: Duration::from_secs(3600),
    };
    let mut server =
        ApiServer::start_with(Store::new(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let store = server.store().clone();
    store.apply(&service("prod", "web", &[], 80)).unwrap();
    let services: Api<Service> = Api::all(client(&server));
    let rv = store.resource_version().to_string();
    let mut stream = services
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    eventually("watch open", BOUND, || {
        store.active_watches(Kind::Service) == 1
    })
    .await;
    store.bookmark_now();
    let event = within("bookmark", BOUND, stream.try_next()).await.unwrap();
    assert!(
        matches!(event, Some(WatchEvent::Bookmark(_))),
        "got {event:?}"
    );

    // Stopping the server ends the open stream (with an error or EOF).
    server.stop();
    let end = within("stream cut", BOUND, stream.try_next()).await;
    assert!(!matches!(end, Ok(Some(_))), "got {end:?}");
    server.restart().unwrap();

    // Streaming lists: the initial state arrives through the watch, closed
    // by the initial-events-end bookmark; no list request at all.
    let lists = store.list_requests(Kind::Service);
    let streamed = reflect(
        services.clone(),
        watcher::Config::default().streaming_lists(),
    )
    .await;
    assert_eq!(names(streamed.state()), ["web"]);
    assert_eq!(store.list_requests(Kind::Service), lists);
    store.apply(&service("prod", "db", &[], 5432)).unwrap();
    eventually("streamed change", BOUND, || streamed.state().len() == 2).await;
}
