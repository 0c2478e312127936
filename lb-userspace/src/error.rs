//! The agent library's one error type.
//!
//! Every error a user can fix names where to fix it: the file, the object
//! (`Kind namespace/name`) and the field path, for example
//! `manifests/demo.yaml: Service default/web: spec.ports[0].nodePort: 70000 is out of range 1-65535`.

use std::path::{Path, PathBuf};

/// Result alias used across `lb-userspace`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the agent library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },

    /// A file is not well-formed YAML or JSON.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with its line and column.
        message: String,
    },

    /// An object (or one of its fields) is invalid: the user must fix
    /// `field` of `object`, in `file` when it came from one.
    #[error("{}{object}: {field}: {message}", file_prefix(file.as_deref()))]
    Invalid {
        /// The manifest the object was read from, when known.
        file: Option<PathBuf>,
        /// The object, `Kind namespace/name` (or `items[3]` when it has no
        /// usable kind or name).
        object: String,
        /// Path of the offending field, e.g. `spec.ports[0].nodePort`.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// An agent setting is invalid (e.g. a Maglev size that is not prime).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The desired state does not fit in the datapath maps.
    #[error("capacity exceeded: {what}: {needed} needed, at most {max} fit")]
    Capacity {
        /// What overflowed (`service ports`, `backends`, `frontends`).
        what: &'static str,
        /// How many the desired state needs.
        needed: usize,
        /// How many the maps hold.
        max: usize,
    },

    /// A BPF map operation failed.
    #[error("map {map}: {op}: {source}")]
    Map {
        /// Pin name of the map (`lb_common::pin::*`).
        map: &'static str,
        /// The operation, with its key (e.g. `update backend 12`).
        op: String,
        /// What the kernel said.
        source: std::io::Error,
    },

    /// A kernel call outside the maps failed (bpffs, netlink, attach).
    #[error("kernel: {0}")]
    Kernel(String),

    /// Any other datapath failure (e.g. an aya error rendered as text).
    #[error("datapath: {0}")]
    Datapath(String),
}

fn file_prefix(file: Option<&Path>) -> String {
    match file {
        Some(f) => format!("{}: ", f.display()),
        None => String::new(),
    }
}

impl Error {
    /// An [`Error::Invalid`] for `object`'s `field`, file unknown.
    pub fn invalid(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            file: None,
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Sets the file of an [`Error::Invalid`] whose file is unknown; any
    /// other error is returned unchanged.
    pub fn in_file(self, path: Option<&Path>) -> Self {
        match self {
            Error::Invalid {
                file: None,
                object,
                field,
                message,
            } => Error::Invalid {
                file: path.map(Path::to_path_buf),
                object,
                field,
                message,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_file_object_and_field() {
        let e = Error::invalid(
            "Service default/web",
            "spec.ports[0].nodePort",
            "70000 is out of range 1-65535",
        )
        .in_file(Some(Path::new("manifests/demo.yaml")));
        assert_eq!(
            e.to_string(),
            "manifests/demo.yaml: Service default/web: spec.ports[0].nodePort: 70000 is out of range 1-65535"
        );
        let e = Error::invalid("Service default/web", "spec.type", "bad");
        assert_eq!(e.to_string(), "Service default/web: spec.type: bad");
    }
}
