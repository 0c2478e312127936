//! Sources of Kubernetes objects: they read Services and EndpointSlices and
//! nothing else. [`manifests`] reads them from files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::translate::ServiceKey;

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

    /// The objects of the Services `keys`: those Services and every
    /// EndpointSlice labelled with one of them.
    pub fn only(&self, keys: &BTreeSet<ServiceKey>) -> Objects {
        let services: Vec<Service> = self
            .services
            .iter()
            .filter(|s| keys.contains(&ServiceKey::of(s)))
            .cloned()
            .collect();
        let slices: Vec<EndpointSlice> = self
            .slices
            .iter()
            .filter(|s| ServiceKey::of_slice(s).is_some_and(|k| keys.contains(&k)))
            .cloned()
            .collect();
        let refs: BTreeSet<ObjectRef> = services
            .iter()
            .map(ObjectRef::service)
            .chain(slices.iter().map(ObjectRef::slice))
            .collect();
        let origins = self
            .origins
            .iter()
            .filter(|(r, _)| refs.contains(r))
            .map(|(r, p)| (r.clone(), p.clone()))
            .collect();
        Objects {
            services,
            slices,
            origins,
        }
    }

    /// The Services whose objects differ between `self` and `newer`: the
    /// Service itself, one of its EndpointSlices, or the file one was read
    /// from.
    pub fn changed_services(&self, newer: &Objects) -> BTreeSet<ServiceKey> {
        type Parts<'a> = (
            Option<(&'a Service, Option<&'a Path>)>,
            BTreeMap<String, (&'a EndpointSlice, Option<&'a Path>)>,
        );
        fn parts(o: &Objects) -> BTreeMap<ServiceKey, Parts<'_>> {
            let mut out: BTreeMap<ServiceKey, Parts<'_>> = BTreeMap::new();
            for s in &o.services {
                out.entry(ServiceKey::of(s)).or_default().0 =
                    Some((s, o.origin(&ObjectRef::service(s))));
            }
            for s in &o.slices {
                if let Some(k) = ServiceKey::of_slice(s) {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    out.entry(k)
                        .or_default()
                        .1
                        .insert(name, (s, o.origin(&ObjectRef::slice(s))));
                }
            }
            out
        }
        let (old, new) = (parts(self), parts(newer));
        let keys: BTreeSet<&ServiceKey> = old.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .cloned()
            .collect()
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
