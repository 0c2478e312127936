//! Sources of Kubernetes objects: they read Services and EndpointSlices and
//! nothing else. [`manifests`] reads them from files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub mod kube;
pub mod manifests;

/// The objects the agent balances from, as a source delivered them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// `v1` Services.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// The file each object was read from (empty for objects that do not
    /// come from files); lets errors found later name the file.
    pub origins: BTreeMap<ObjectRef, PathBuf>,
}

impl Objects {
    /// The file `obj` was read from, if it came from one.
    pub fn origin(&self, obj: &ObjectRef) -> Option<&Path> {
        self.origins.get(obj).map(PathBuf::as_path)
    }
}

/// Names one object: `Kind namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// The reference of a Service.
    pub fn service(svc: &Service) -> Self {
        Self::new("Service", &svc.metadata)
    }

    /// The reference of an EndpointSlice.
    pub fn slice(slice: &EndpointSlice) -> Self {
        Self::new("EndpointSlice", &slice.metadata)
    }

    fn new(
        kind: &'static str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Self {
        Self {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectRef {
    /// `Kind namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}
