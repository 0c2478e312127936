//! Builders and helpers shared by the host test targets (`pipeline.rs`,
//! `isolation.rs`, `http.rs`).

#![allow(dead_code, reason = "each test target uses a part of the helpers")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_userspace::model::{Backend, BackendState, ServicePortName};
use lb_userspace::source::{Objects, manifests};
use lb_userspace::translate::NodeContext;

/// A file under `tests/testdata`.
pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata")
        .join(name)
}

/// The node the tests translate for: `node-a`, address 198.18.0.2.
pub fn node_a() -> NodeContext {
    NodeContext {
        node_name: "node-a".into(),
        node_addrs: vec![Ipv4Addr::new(198, 18, 0, 2)],
    }
}

/// A service port name.
pub fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
    }
}

/// A backend on `node` (local when it is `node-a`).
pub fn be(addr: [u8; 4], port: u16, state: BackendState, node: &str) -> Backend {
    Backend {
        addr: addr.into(),
        port,
        state,
        node_name: Some(node.into()),
        local: node == "node-a",
    }
}

/// Objects parsed from YAML text, as if read from `x.yaml`.
pub fn parse_str(text: &str) -> Objects {
    let mut objs = Objects::default();
    manifests::parse_into(Path::new("x.yaml"), text, &mut objs).unwrap();
    objs
}

/// A Service `ns/name` in YAML: `created` is its creationTimestamp (or
/// none when empty), `spec` the indented lines under `spec:`.
pub fn service(ns: &str, name: &str, created: &str, spec: &str) -> String {
    let ts = if created.is_empty() {
        String::new()
    } else {
        format!(", creationTimestamp: \"{created}\"")
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}{ts}}}\nspec:\n{spec}"
    )
}

/// An EndpointSlice of Service `ns/svc` in YAML with one unnamed TCP port
/// and `endpoints` (flow-style list items, one per line, e.g.
/// `{addresses: [10.0.0.1], nodeName: node-a}`).
pub fn slice(ns: &str, svc: &str, port: u16, endpoints: &[&str]) -> String {
    let eps: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-x, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: {port}}}]\nendpoints:\n{eps}"
    )
}

/// A free TCP port on this host (bound and released: another process could
/// take it in between, which is unlikely on a test host).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the status code and
/// the body, or the I/O error (a read times out after `timeout`).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out:?}")))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_owned()))
}
