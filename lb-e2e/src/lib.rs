//! End-to-end suites of the load balancer: each file of `tests/` is one
//! scenario family run against the real `lb-agent` and kernel programs in
//! the namespace labs of `lb-testkit` (`cargo xtask test` runs them as
//! root, one test at a time, with `LB_AGENT_BIN` set to a fresh build).
//!
//! - `e2e.rs`: one node, the agent from a manifest file (reloads, maps,
//!   bpftool, `lb-agent flows` / `backends`);
//! - `policies.rs`: round-robin, least-connection and Maglev over traffic;
//! - `kube.rs`: the agent against the API-server double (list/watch);
//! - `cluster.rs`: two nodes, remote backends (SNAT, forwarding);
//! - `deploy.rs`: `deploy/` validated, the image built, the DaemonSet's
//!   capabilities;
//! - `churn.rs`: flows through rolling updates and port reuse;
//! - `flood.rs`: a SYN flood against established connections.
