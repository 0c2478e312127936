//! The manifests the lab feeds the agent: what
//! `kubectl get svc,endpointslices -A -o yaml` prints for one NodePort
//! service `demo/echo` (TCP and UDP on node port 30090).

use std::{fmt::Write as _, net::Ipv4Addr};

/// The service's node port (TCP and UDP).
pub const NODE_PORT: u16 = 30090;
/// The port the pods listen on (TCP and UDP).
pub const POD_PORT: u16 = 8080;
/// The node name the endpoints are on, and the agent's `--node-name`.
pub const NODE_NAME: &str = "node-a";

/// A `kind: List` with the Service `demo/echo` and one EndpointSlice whose
/// ready endpoints are `endpoints`.
///
/// Like the EndpointSlice controller, the slice names each port after the
/// Service port it serves (`http`, `echo-udp`) and gives the resolved target
/// port number; the Service's `http` port targets the named container port
/// `web`.
pub fn echo_service(endpoints: &[Ipv4Addr]) -> String {
    let endpoints: Vec<(Ipv4Addr, &str)> = endpoints.iter().map(|&a| (a, NODE_NAME)).collect();
    echo_service_with(&endpoints, &EchoOptions::default())
}

/// Variants of the `demo/echo` Service for [`echo_service_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoOptions {
    /// `externalTrafficPolicy: Local` (default: Cluster, not written).
    pub local_policy: bool,
    /// `type: LoadBalancer` with this address in
    /// `status.loadBalancer.ingress` (served on `port` 80).
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// The `lb-agent.dev/balancing` annotation (default: none, Maglev).
    pub balancing: Option<&'static str>,
    /// The TCP port's target as a number, served on this pod port
    /// (default: the named container port `web`, which is [`POD_PORT`]).
    pub tcp_target_port: Option<u16>,
}

/// An endpoint's `conditions` in the EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    /// `ready: true, serving: true, terminating: false`.
    #[default]
    Ready,
    /// A pod shutting down that still serves: `ready: false, serving: true,
    /// terminating: true` (what the EndpointSlice controller writes during
    /// a pod's grace period).
    Terminating,
}

impl Condition {
    /// The `conditions:` lines, indented for [`echo_service_conditions`].
    fn yaml(self) -> &'static str {
        match self {
            Self::Ready => "      ready: true\n      serving: true\n      terminating: false\n",
            Self::Terminating => {
                "      ready: false\n      serving: true\n      terminating: true\n"
            }
        }
    }
}

/// Like [`echo_service`], with each endpoint on the node it names
/// (`nodeName`) and the Service variant `options`. With the default options
/// and every endpoint on [`NODE_NAME`] the text is [`echo_service`]'s.
pub fn echo_service_with(endpoints: &[(Ipv4Addr, &str)], options: &EchoOptions) -> String {
    let endpoints: Vec<(Ipv4Addr, &str, Condition)> = endpoints
        .iter()
        .map(|&(addr, node)| (addr, node, Condition::Ready))
        .collect();
    echo_service_conditions(&endpoints, options)
}

/// Like [`echo_service_with`], with each endpoint's [`Condition`].
pub fn echo_service_conditions(
    endpoints: &[(Ipv4Addr, &str, Condition)],
    options: &EchoOptions,
) -> String {
    let kind = if options.load_balancer_ip.is_some() {
        "LoadBalancer"
    } else {
        "NodePort"
    };
    let policy = if options.local_policy {
        "    externalTrafficPolicy: Local\n"
    } else {
        ""
    };
    let annotations = match options.balancing {
        Some(p) => format!("    annotations:\n      lb-agent.dev/balancing: {p}\n"),
        None => String::new(),
    };
    let (target, tcp_port) = match options.tcp_target_port {
        Some(port) => (port.to_string(), port),
        None => ("web".to_owned(), POD_PORT),
    };
    let status = match options.load_balancer_ip {
        Some(ip) => format!("  status:\n    loadBalancer:\n      ingress:\n      - ip: {ip}\n"),
        None => String::new(),
    };
    let mut yaml = format!(
        "apiVersion: v1
kind: List
metadata:
  resourceVersion: \"\"
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: echo
    namespace: demo
    labels:
      app: echo
{annotations}  spec:
    type: {kind}
{policy}    selector:
      app: echo
    clusterIP: 10.96.0.90
    clusterIPs:
    - 10.96.0.90
    ipFamilies:
    - IPv4
    ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: {target}
      nodePort: 30090
    - name: echo-udp
      protocol: UDP
      port: 80
      targetPort: 8080
      nodePort: 30090
{status}- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: echo-x7k2p
    namespace: demo
    labels:
      kubernetes.io/service-name: echo
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
  addressType: IPv4
  ports:
  - name: http
    protocol: TCP
    port: {tcp_port}
  - name: echo-udp
    protocol: UDP
    port: 8080
  endpoints:"
    );
    yaml.push_str(if endpoints.is_empty() { " []\n" } else { "\n" });
    for (i, (addr, node, condition)) in endpoints.iter().enumerate() {
        let _ = write!(
            yaml,
            "  - addresses:
    - {addr}
    conditions:
{}    nodeName: {node}
    targetRef:
      kind: Pod
      name: echo-{i}
      namespace: demo
",
            condition.yaml()
        );
    }
    yaml
}

/// A manifest the agent must reject (broken YAML).
pub const MALFORMED: &str =
    "apiVersion: v1\nkind: List\nitems:\n- kind: Service\n  spec: {ports: [\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_endpoint() {
        let yaml = echo_service(&[Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 12)]);
        assert!(yaml.contains("    - 198.18.1.11\n"));
        assert!(yaml.contains("    - 198.18.1.12\n"));
        assert_eq!(yaml.matches("nodeName: node-a").count(), 2);
        assert!(yaml.contains("nodePort: 30090"));
        assert!(yaml.contains("type: NodePort\n"));
        assert!(!yaml.contains("externalTrafficPolicy"));
        assert!(!yaml.contains("status:"));
    }

    #[test]
    fn variants_name_nodes_policy_and_load_balancer() {
        let a = Ipv4Addr::new(198, 18, 1, 11);
        let b = Ipv4Addr::new(198, 18, 2, 11);
        let yaml = echo_service_with(
            &[(a, "node-a"), (b, "node-b")],
            &EchoOptions {
                local_policy: true,
                load_balancer_ip: Some(Ipv4Addr::new(198, 18, 0, 100)),
                balancing: Some("round-robin"),
                tcp_target_port: Some(9090),
            },
        );
        assert!(yaml.contains("    nodeName: node-a\n"));
        assert!(yaml.contains("    nodeName: node-b\n"));
        assert!(yaml.contains("    type: LoadBalancer\n    externalTrafficPolicy: Local\n"));
        assert!(yaml.contains("      - ip: 198.18.0.100\n"));
        assert!(yaml.contains("    annotations:\n      lb-agent.dev/balancing: round-robin\n"));
        assert!(yaml.contains("      targetPort: 9090\n"));
        assert!(yaml.contains("  - name: http\n    protocol: TCP\n    port: 9090\n"));
    }

    #[test]
    fn terminating_endpoints_still_serve() {
        let yaml = echo_service_conditions(
            &[
                (Ipv4Addr::new(198, 18, 1, 11), NODE_NAME, Condition::Ready),
                (
                    Ipv4Addr::new(198, 18, 1, 12),
                    NODE_NAME,
                    Condition::Terminating,
                ),
            ],
            &EchoOptions::default(),
        );
        assert!(yaml.contains(
            "    - 198.18.1.11\n    conditions:\n      ready: true\n      serving: true\n      \
             terminating: false\n"
        ));
        assert!(yaml.contains(
            "    - 198.18.1.12\n    conditions:\n      ready: false\n      serving: true\n      \
             terminating: true\n"
        ));
        assert_eq!(
            echo_service(&[Ipv4Addr::new(198, 18, 1, 11)]),
            echo_service_conditions(
                &[(Ipv4Addr::new(198, 18, 1, 11), NODE_NAME, Condition::Ready)],
                &EchoOptions::default()
            )
        );
    }
}
