//! Services and EndpointSlices read from manifest files.
//!
//! A file holds YAML exactly as `kubectl get svc,endpointslices -A -o yaml`
//! prints it (`kind: List` with `items`), a multi-document YAML stream, a
//! single object, or the JSON equivalents. Objects are recognised by
//! `apiVersion` + `kind` (`v1` Service, `discovery.k8s.io/v1` EndpointSlice);
//! other kinds are skipped with a debug log.
//!
//! Each object is parsed into its k8s-openapi type through
//! `serde_path_to_error`, so a type error names the file, the object and the
//! field path (YAML through a generic value first; JSON straight from its
//! text, see [`Item`]). Loading is all or nothing: the
//! first error is returned and no object is.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize as _, de::DeserializeOwned};
use serde_json::{Value, value::RawValue};

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
    // Kept until the next load: without the slack that growing them left.
    objects.services.shrink_to_fit();
    objects.slices.shrink_to_fit();
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
    let docs: Vec<Item> = if is_json {
        serde_json::Deserializer::from_str(text)
            .into_iter::<&RawValue>()
            .map(|d| d.map(Item::Json))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Syntax {
                path: file.to_path_buf(),
                message: format!("invalid JSON: {e}"),
            })?
    } else {
        serde_saphyr::from_multiple::<Value>(text)
            .map_err(|e| Error::Syntax {
                path: file.to_path_buf(),
                message: format!("invalid YAML: {e}"),
            })?
            .into_iter()
            .map(Item::Value)
            .collect()
    };
    let several = docs.len() > 1;
    for (d, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let doc_loc = if several {
            format!("document {}", d + 1)
        } else {
            String::new()
        };
        let head = doc.head();
        let kind = as_text(&head.kind).unwrap_or_default().to_owned();
        let is_list = kind == "List" || (kind.ends_with("List") && head.has_items);
        if is_list {
            let Some(items) = doc.items() else {
                return Err(Error::Invalid {
                    file: Some(file.to_path_buf()),
                    object: located(&doc_loc, &kind),
                    field: "items".into(),
                    message: "is not a list".into(),
                });
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

/// One document or list item before it is typed. YAML is parsed into a
/// generic value first; JSON is kept as its text and each object parsed
/// straight into its type, so a large file never exists as a generic tree
/// (which takes about ten times the file's size and leaves the allocator's
/// heap fragmented long after).
enum Item<'a> {
    Value(Value),
    Json(&'a RawValue),
}

/// The fields read before an object is typed, each as found (a wrong type
/// reads as missing, as for any other unknown content).
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    api_version: Option<Value>,
    kind: Option<Value>,
    metadata: Option<Value>,
    /// Whether an `items` key is present (read as its presence only).
    #[serde(default, rename = "items", deserialize_with = "present")]
    has_items: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// A head field's text, if it is a string.
fn as_text(v: &Option<Value>) -> Option<&str> {
    v.as_ref().and_then(Value::as_str)
}

impl Head {
    fn meta(&self, key: &str) -> Option<String> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

impl<'a> Item<'a> {
    fn is_null(&self) -> bool {
        match self {
            Item::Value(v) => v.is_null(),
            Item::Json(raw) => raw.get().trim() == "null",
        }
    }

    fn is_object(&self) -> bool {
        match self {
            Item::Value(v) => v.is_object(),
            Item::Json(raw) => raw.get().trim_start().starts_with('{'),
        }
    }

    /// The head fields; empty for anything but a mapping.
    fn head(&self) -> Head {
        match self {
            Item::Value(v) => Head::deserialize(v).unwrap_or_default(),
            Item::Json(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
        }
    }

    /// A List's `items` (taken, not cloned: a List of 10,000 Services is
    /// most of the file); `None` if they are not a list.
    fn items(self) -> Option<Vec<Item<'a>>> {
        match self {
            Item::Value(mut v) => match v.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => Some(items.into_iter().map(Item::Value).collect()),
                Some(Value::Null) | None => Some(Vec::new()),
                Some(_) => None,
            },
            Item::Json(raw) => {
                #[derive(serde::Deserialize)]
                struct List<'a> {
                    #[serde(borrow)]
                    items: Option<Vec<&'a RawValue>>,
                }
                let list: List = serde_json::from_str(raw.get()).ok()?;
                Some(
                    list.items
                        .unwrap_or_default()
                        .into_iter()
                        .map(Item::Json)
                        .collect(),
                )
            }
        }
    }

    /// The object as `T`; a type error names the field path.
    fn typed<T: DeserializeOwned>(self, file: &Path, object: &str) -> Result<T> {
        let result = match self {
            Item::Value(v) => serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                (path, e.into_inner().to_string())
            }),
            Item::Json(raw) => {
                let mut de = serde_json::Deserializer::from_str(raw.get());
                serde_path_to_error::deserialize(&mut de).map_err(|e| {
                    let path = e.path().to_string();
                    (path, e.into_inner().to_string())
                })
            }
        };
        result.map_err(|(field, message)| Error::Invalid {
            file: Some(file.to_path_buf()),
            object: object.to_string(),
            field: if field == "." { "(root)".into() } else { field },
            message,
        })
    }
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
fn add_object(file: &Path, loc: &str, item: Item, objects: &mut Objects) -> Result<()> {
    let invalid = |object: String, field: &str, message: String| Error::Invalid {
        file: Some(file.to_path_buf()),
        object,
        field: field.to_string(),
        message,
    };
    if !item.is_object() {
        return Err(invalid(
            loc.to_string(),
            "(root)",
            "is not a mapping (expected a Kubernetes object)".into(),
        ));
    }
    let head = item.head();
    let (Some(api_version), Some(kind)) = (as_text(&head.api_version), as_text(&head.kind)) else {
        let field = if as_text(&head.api_version).is_none() {
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
    let display = match (head.meta("namespace"), head.meta("name")) {
        (ns, Some(name)) => format!(
            "{kind} {}/{name}",
            ns.as_deref().unwrap_or(DEFAULT_NAMESPACE)
        ),
        (_, None) => format!("{kind} ({loc})"),
    };

    match (api_version, kind) {
        ("v1", "Service") => {
            let mut svc: Service = item.typed(file, &display)?;
            let r = named(file, &display, &mut svc.metadata, "Service")?;
            remember(file, r, objects)?;
            objects.services.push(svc);
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let mut slice: EndpointSlice = item.typed(file, &display)?;
            compact(&mut slice);
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

/// Drops the spare capacity a streaming parse leaves in a slice's lists
/// (each grows by doubling: about a third of a large file's endpoints).
fn compact(slice: &mut EndpointSlice) {
    for e in slice.endpoints.iter_mut().flatten() {
        e.addresses.shrink_to_fit();
    }
    if let Some(e) = &mut slice.endpoints {
        e.shrink_to_fit();
    }
    if let Some(p) = &mut slice.ports {
        p.shrink_to_fit();
    }
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
    fn json_errors_name_the_object_and_path_as_yaml_ones_do() {
        let list = |item: &str| format!(r#"{{"apiVersion":"v1","kind":"List","items":[{item}]}}"#);
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"w"},"spec":{"ports":[{"port":"eighty"}]}}"#;
        let e = parse("a.json", &list(svc)).unwrap_err().to_string();
        assert!(
            e.starts_with("a.json: Service default/w: spec.ports[0].port: invalid type"),
            "{e}"
        );
        let e = parse("a.json", &list("5")).unwrap_err().to_string();
        assert_eq!(
            e,
            "a.json: items[0]: (root): is not a mapping (expected a Kubernetes object)"
        );
        let e = parse("a.json", r#"{"apiVersion":"v1","kind":"List","items":{}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "a.json: List: items: is not a list");
        let e = parse("a.json", r#"{"apiVersion":"v1","metadata":{"name":"x"}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "a.json: object: kind: missing (every object needs apiVersion and kind)"
        );
        let objs = parse(
            "a.json",
            "null\n{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\"}",
        )
        .unwrap();
        assert!(objs.services.is_empty());
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
