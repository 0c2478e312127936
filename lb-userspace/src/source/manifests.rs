//! Services and EndpointSlices read from manifest files.
//!
//! A file holds YAML exactly as `kubectl get svc,endpointslices -A -o yaml`
//! prints it (`kind: List` with `items`), a multi-document YAML stream, a
//! single object, or the JSON equivalents. Objects are recognised by
//! `apiVersion` + `kind` (`v1` Service, `discovery.k8s.io/v1` EndpointSlice);
//! other kinds are skipped with a debug log.
//!
//! Each document is parsed to a generic value first, then each object into
//! its k8s-openapi type through `serde_path_to_error`, so a type error names
//! the file, the object and the field path. Loading is all or nothing: the
//! first error is returned and no object is.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{ObjectRef, Objects};
use crate::error::{Error, Result};

/// Namespace given to objects whose manifest has none (what `kubectl apply`
/// would do in the default context).
const DEFAULT_NAMESPACE: &str = "default";

/// Reads every Service and EndpointSlice in `path`: one file, or every
/// `*.yaml`, `*.yml` and `*.json` file directly in a directory, in name
/// order.
pub fn load(path: &Path) -> Result<Objects> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let files = if std::fs::metadata(path).map_err(io)?.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io)? {
            let entry = entry.map_err(io)?;
            let p = entry.path();
            let is_manifest = matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            );
            if is_manifest && entry.file_type().map_err(io)?.is_file() {
                files.push(p);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };

    let mut objects = Objects::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        parse_into(file, &text, &mut objects)?;
    }
    tracing::debug!(
        files = files.len(),
        services = objects.services.len(),
        slices = objects.slices.len(),
        "manifests loaded from {}",
        path.display()
    );
    Ok(objects)
}

/// Parses the text of one manifest file (named `file` in errors) and adds
/// its objects to `objects`. On error `objects` may hold part of the file.
pub fn parse_into(file: &Path, text: &str, objects: &mut Objects) -> Result<()> {
    let is_json = file.extension().and_then(|e| e.to_str()) == Some("json");
    let docs: Vec<Value> = if is_json {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Syntax {
                path: file.to_path_buf(),
                message: format!("invalid JSON: {e}"),
            })?
    } else {
        serde_saphyr::from_multiple::<Value>(text).map_err(|e| Error::Syntax {
            path: file.to_path_buf(),
            message: format!("invalid YAML: {e}"),
        })?
    };
    let several = docs.len() > 1;
    for (d, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let doc_loc = if several {
            format!("document {}", d + 1)
        } else {
            String::new()
        };
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let is_list = kind == "List" || (kind.ends_with("List") && doc.get("items").is_some());
        if is_list {
            // Taken, not cloned: a List of 10,000 Services is most of the file.
            let items = match doc.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => items,
                Some(Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(Error::Invalid {
                        file: Some(file.to_path_buf()),
                        object: located(&doc_loc, &kind),
                        field: "items".into(),
                        message: "is not a list".into(),
                    });
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                let loc = located(&doc_loc, &format!("items[{i}]"));
                add_object(file, &loc, item, objects)?;
            }
        } else {
            let loc = if several { doc_loc } else { "object".into() };
            add_object(file, &loc, doc, objects)?;
        }
    }
    Ok(())
}

fn located(doc_loc: &str, what: &str) -> String {
    if doc_loc.is_empty() {
        what.to_string()
    } else {
        format!("{doc_loc} {what}")
    }
}

/// Recognises one object by apiVersion + kind and adds it if it is one the
/// agent reads. `loc` says where it is in the file (`items[3]`).
fn add_object(file: &Path, loc: &str, value: Value, objects: &mut Objects) -> Result<()> {
    let invalid = |object: String, field: &str, message: String| Error::Invalid {
        file: Some(file.to_path_buf()),
        object,
        field: field.to_string(),
        message,
    };
    if !value.is_object() {
        return Err(invalid(
            loc.to_string(),
            "(root)",
            "is not a mapping (expected a Kubernetes object)".into(),
        ));
    }
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        let field = if text("apiVersion").is_none() {
            "apiVersion"
        } else {
            "kind"
        };
        return Err(invalid(
            loc.to_string(),
            field,
            "missing (every object needs apiVersion and kind)".into(),
        ));
    };
    // A readable name for errors before the object is typed.
    let meta_str = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let display = match (meta_str("namespace"), meta_str("name")) {
        (ns, Some(name)) => format!(
            "{kind} {}/{name}",
            ns.as_deref().unwrap_or(DEFAULT_NAMESPACE)
        ),
        (_, None) => format!("{kind} ({loc})"),
    };

    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let mut svc: Service = typed(file, &display, value)?;
            let r = named(file, &display, &mut svc.metadata, "Service")?;
            remember(file, r, objects)?;
            objects.services.push(svc);
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let mut slice: EndpointSlice = typed(file, &display, value)?;
            let r = named(file, &display, &mut slice.metadata, "EndpointSlice")?;
            remember(file, r, objects)?;
            objects.slices.push(slice);
        }
        _ => tracing::debug!(
            "{}: {loc}: skipping {api_version} {kind} (not a Service or EndpointSlice)",
            file.display()
        ),
    }
    Ok(())
}

/// Deserializes `value` into `T`; a type error names the field path.
fn typed<T: DeserializeOwned>(file: &Path, object: &str, value: Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        Error::Invalid {
            file: Some(file.to_path_buf()),
            object: object.to_string(),
            field: if field == "." { "(root)".into() } else { field },
            message: e.into_inner().to_string(),
        }
    })
}

/// Checks that the object has a name and gives it the default namespace if
/// it has none.
fn named(
    file: &Path,
    object: &str,
    meta: &mut ObjectMeta,
    kind: &'static str,
) -> Result<ObjectRef> {
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err(Error::Invalid {
            file: Some(file.to_path_buf()),
            object: object.to_string(),
            field: "metadata.name".into(),
            message: "missing".into(),
        });
    }
    if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some(DEFAULT_NAMESPACE.into());
    }
    Ok(ObjectRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    })
}

/// Records where `r` came from; the same object twice is an error.
fn remember(file: &Path, r: ObjectRef, objects: &mut Objects) -> Result<()> {
    if let Some(first) = objects.origins.get(&r) {
        return Err(Error::Invalid {
            file: Some(file.to_path_buf()),
            object: r.to_string(),
            field: "metadata.name".into(),
            message: format!("defined twice (first in {})", first.display()),
        });
    }
    objects.origins.insert(r, PathBuf::from(file));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Result<Objects> {
        let mut objs = Objects::default();
        parse_into(Path::new(name), text, &mut objs)?;
        Ok(objs)
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 30080\n";

    #[test]
    fn single_object_and_multi_doc() {
        let objs = parse("a.yaml", SVC).unwrap();
        assert_eq!(objs.services.len(), 1);
        let two = format!(
            "{SVC}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n---\n{}",
            SVC.replace("name: web", "name: api")
        );
        let objs = parse("a.yaml", &two).unwrap();
        assert_eq!(objs.services.len(), 2);
        assert_eq!(objs.origins.len(), 2);
    }

    #[test]
    fn missing_namespace_defaults() {
        let objs = parse("a.yaml", &SVC.replace("  namespace: default\n", "")).unwrap();
        assert_eq!(
            objs.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn json_list() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"w","namespace":"d"},"spec":{"ports":[{"port":80}]}}]}"#;
        let objs = parse("a.json", json).unwrap();
        assert_eq!(objs.services.len(), 1);
    }

    #[test]
    fn wrong_type_names_object_and_path() {
        let bad = SVC.replace("port: 80", "port: eighty");
        let e = parse("m/a.yaml", &bad).unwrap_err().to_string();
        assert!(
            e.starts_with("m/a.yaml: Service default/web: spec.ports[0].port: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_object_is_an_error() {
        let e = parse("a.yaml", &format!("{SVC}---\n{SVC}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn missing_kind_is_an_error() {
        let e = parse("a.yaml", "apiVersion: v1\nmetadata: {name: x}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "a.yaml: object: kind: missing (every object needs apiVersion and kind)"
        );
    }
}
