//! lb-agent: the userspace half of the load balancer.
//!
//! The agent is one pipeline:
//!
//! ```text
//! source (manifests | Kubernetes)  →  translate  →  plan  →  writer
//!   k8s objects                      desired state   map ops   pinned BPF maps
//! ```
//!
//! * [`source`] reads Service and EndpointSlice objects, nothing else, and
//!   says which Services changed.
//! * [`translate`] turns them into the desired state ([`model`]), with
//!   kube-proxy's semantics; [`incremental`] keeps it current from the
//!   Services that changed.
//! * [`plan`] diffs the desired state against what the maps hold
//!   ([`writer::MapState`]) and emits ordered [`writer::Op`]s, for every
//!   service or for the changed ones only; Maglev tables come from [`maglev`].
//! * [`writer`] applies them: [`writer::kernel`] to the real maps,
//!   [`writer::memory`] in tests.
//! * [`loader`] loads, pins and attaches the programs; [`agent`] runs the loop.

pub mod agent;
pub mod cli;
pub mod error;
pub mod gc;
pub mod health;
pub mod incremental;
pub mod inspect;
pub mod loader;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod pinned;
pub mod plan;
pub mod source;
pub mod translate;
pub mod writer;
