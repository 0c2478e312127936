//! The Kubernetes deployment (`deploy/`) checked on this machine:
//!
//! - every object validates against the Kubernetes JSON schemas
//!   (`kubernetes-validate`, its newest Kubernetes version) and the
//!   kustomization renders;
//! - `cargo xtask image` builds an image whose only file is a static
//!   `lb-agent` that runs;
//! - the agent runs with exactly the capabilities the DaemonSet grants (read
//!   from `deploy/daemonset.yaml`, so test and manifest cannot drift), serves
//!   a NodePort in the network-namespace lab, and fails to start when any
//!   one of them is missing.
//!
//! They need root (BPF, namespaces, buildah's storage) and run one at a time:
//! `cargo test -p lb-e2e --test deploy -- --test-threads=1`; `cargo xtask
//! test` runs them so, with `LB_AGENT_BIN` set to a fresh build. Without
//! root or a tool they print SKIPPED and pass, except under CI, where they
//! fail.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use lb_testkit::{
    cmd,
    lab::{
        self, Lab,
        agent::{Agent, AgentConfig, AgentSource},
        client::{self, Tally},
        manifest,
    },
};
use serde_json::Value;

/// The DaemonSet, relative to the workspace root.
const DAEMONSET: &str = "deploy/daemonset.yaml";
/// The kustomization, relative to the workspace root.
const KUSTOMIZATION: &str = "deploy/kustomization.yaml";
/// Example objects that are not part of the kustomization but must be valid.
const EXAMPLES: &[&str] = &["deploy/examples/demo.yaml"];
/// The namespace every namespaced object of `deploy/` lives in.
const NAMESPACE: &str = "lb-system";
/// The agent's container in the DaemonSet.
const CONTAINER: &str = "lb-agent";

use lb_testkit::guard::{can_run_as_root as root_or_skip, skip};

fn workspace_file(rel: &str) -> PathBuf {
    lb_testkit::workspace_root().join(rel)
}

/// The YAML documents of a file, as JSON values (empty documents dropped).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The objects of a file: its documents, with each `kind: List` replaced by
/// its items (the schemas have no `List`).
fn objects(path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in yaml_documents(path) {
        if doc["kind"] == "List" {
            let items = doc["items"]
                .as_array()
                .unwrap_or_else(|| panic!("{}: a List without items", path.display()));
            out.extend(items.iter().cloned());
        } else {
            out.push(doc);
        }
    }
    out
}

/// `kind/name` of an object, for messages.
fn describe(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The `resources:` of the kustomization.
fn kustomization_resources() -> Vec<String> {
    let docs = yaml_documents(&workspace_file(KUSTOMIZATION));
    let kustomization = docs.first().expect("an empty kustomization.yaml");
    assert_eq!(kustomization["kind"], "Kustomization", "{KUSTOMIZATION}");
    assert_eq!(kustomization["namespace"], NAMESPACE, "{KUSTOMIZATION}");
    kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml has no resources")
        .iter()
        .map(|r| {
            r.as_str()
                .expect("a resource that is not a string")
                .to_owned()
        })
        .collect()
}

/// The newest Kubernetes version whose schemas `kubernetes-validate` ships.
fn newest_schema_version() -> String {
    let out = cmd::output(Command::new("python3").args([
        "-c",
        "import kubernetes_validate.utils as u; print(u.latest_version())",
    ]))
    .expect("ask kubernetes-validate for its newest Kubernetes version");
    out.trim().to_owned()
}

fn kubernetes_validate_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every object of `deploy/` (the kustomization's resources, then the
/// rendered kustomization) and of the examples validates against the
/// Kubernetes schemas, strictly (no unknown fields).
///
/// Without `kubectl`, the render step falls back to checking that the
/// kustomization lists every manifest of `deploy/` (which it always checks);
/// under CI, where setup installs `kubectl`, it never falls back.
#[test]
fn deploy_manifests_validate_against_kubernetes_schemas() {
    const TEST: &str = "deploy_manifests_validate_against_kubernetes_schemas";
    let deploy = workspace_file("deploy");

    // The kustomization lists each manifest of deploy/, and only existing ones.
    let resources = kustomization_resources();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&deploy)
        .expect("read deploy/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    let listed: BTreeSet<String> = resources.iter().cloned().collect();
    assert_eq!(
        listed, on_disk,
        "{KUSTOMIZATION} must list exactly the manifests in deploy/"
    );

    if !kubernetes_validate_installed() {
        skip(
            TEST,
            "the Python module kubernetes_validate is missing; run `cargo xtask setup`",
        );
        return;
    }
    let version = newest_schema_version();
    let work = tempfile::tempdir().expect("temp dir");

    // One file per source, one document per object (JSON is YAML).
    let mut files = Vec::new();
    let mut expected = 0;
    let mut kustomized = Vec::new();
    let sources = resources
        .iter()
        .map(|r| format!("deploy/{r}"))
        .chain(EXAMPLES.iter().map(|e| (*e).to_owned()));
    for (i, rel) in sources.enumerate() {
        let objects = objects(&workspace_file(&rel));
        assert!(!objects.is_empty(), "{rel} holds no object");
        let docs: Vec<String> = objects.iter().map(Value::to_string).collect();
        let file = work.path().join(format!("{i}-{}", rel.replace('/', "_")));
        std::fs::write(&file, docs.join("\n---\n")).expect("write objects");
        expected += objects.len();
        files.push(file);
        if !EXAMPLES.contains(&rel.as_str()) {
            kustomized.extend(objects);
        }
    }

    // The rendered kustomization: every object, in lb-system when namespaced.
    if let Some(kubectl) = cmd::find_program("kubectl") {
        let rendered = cmd::output(Command::new(kubectl).arg("kustomize").arg(&deploy))
            .unwrap_or_else(|e| panic!("kubectl kustomize deploy/: {e:#}"));
        let file = work.path().join("rendered.yaml");
        std::fs::write(&file, &rendered).expect("write the rendered kustomization");
        let objects = objects(&file);
        let names = |list: &[Value]| -> BTreeSet<String> { list.iter().map(describe).collect() };
        assert_eq!(
            names(&objects),
            names(&kustomized),
            "kubectl kustomize deploy/ renders other objects than the listed files hold"
        );
        for object in &objects {
            let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"]
                .contains(&object["kind"].as_str().unwrap_or_default());
            if !cluster_scoped {
                assert_eq!(
                    object["metadata"]["namespace"],
                    NAMESPACE,
                    "{} is not in {NAMESPACE}",
                    describe(object)
                );
            }
        }
        expected += objects.len();
        files.push(file);
    } else {
        skip(
            &format!("{TEST} (kustomize render)"),
            "`kubectl` is missing (Debian: kubernetes-client); only checked that the \
             kustomization lists every manifest",
        );
    }

    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", &version])
        .args(&files)
        .output()
        .expect("run python3 -m kubernetes_validate");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("kubernetes-validate --strict -k {version}:\n{report}");
    let passes = |l: &str| l.starts_with("INFO") && l.contains(" passed ");
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !passes(l))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "kubernetes-validate ({}) reported:\n{}",
        out.status,
        problems.join("\n")
    );
    let passed = report.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, expected, "objects validated vs objects found");
}

/// The agent's container in the DaemonSet.
fn agent_container() -> Value {
    let docs = yaml_documents(&workspace_file(DAEMONSET));
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("no DaemonSet in deploy/daemonset.yaml");
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == CONTAINER))
        .cloned()
        .unwrap_or_else(|| panic!("the DaemonSet has no container {CONTAINER}"))
}

/// The DaemonSet says what the agent needs: host network, the host's bpffs,
/// the node name, health probes on the metrics port, the image `cargo xtask
/// image` builds, and no privilege beyond its capabilities.
#[test]
fn daemonset_runs_the_agent_as_documented() {
    let docs = yaml_documents(&workspace_file(DAEMONSET));
    let pod = &docs[0]["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "lb-agent");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null())),
        "the DaemonSet must tolerate every taint"
    );
    let bpffs = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["hostPath"]["path"] == "/sys/fs/bpf"))
        .expect("no hostPath volume for /sys/fs/bpf");
    assert_eq!(bpffs["hostPath"]["type"], "DirectoryOrCreate");

    let c = agent_container();
    assert_eq!(
        c["image"],
        image_ref(),
        "the image `cargo xtask image` tags"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let joined = args.join(" ");
    for expected in [
        "run --interface $(LB_INTERFACE)",
        "--node-name $(NODE_NAME)",
        "--metrics-addr 0.0.0.0:9995",
    ] {
        assert!(
            joined.contains(expected),
            "args {joined:?} lack {expected:?}"
        );
    }
    let env = c["env"].as_array().expect("env");
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))
    };
    assert_eq!(var("LB_INTERFACE")["value"], "eth0");
    assert_eq!(
        var("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(c["ports"][0]["containerPort"], 9995);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"], c["ports"][0]["name"],
            "{probe}"
        );
    }
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/sys/fs/bpf"))
        .expect("/sys/fs/bpf is not mounted");
    assert_eq!(mount["mountPropagation"], "HostToContainer");

    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
}

/// Removes a buildah working container (and unmounts it) on drop.
struct WorkingContainer {
    buildah: PathBuf,
    name: String,
}

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        let _ = cmd::quiet(Command::new(&self.buildah).args(["umount", &self.name]));
        if let Err(e) = cmd::quiet(Command::new(&self.buildah).args(["rm", &self.name])) {
            eprintln!("buildah rm {}: {e:#}", self.name);
        }
    }
}

/// `cargo xtask image` (run as a user runs it) builds `localhost/lb-agent`,
/// whose root holds one file: a static `lb-agent` (no ELF interpreter) that
/// runs `--help`, started by the image's entry point.
#[test]
fn image_builds_and_contains_static_agent() {
    const TEST: &str = "image_builds_and_contains_static_agent";
    if !root_or_skip(TEST) {
        return;
    }
    let Some(buildah) = cmd::find_program("buildah") else {
        skip(TEST, "buildah is missing (`cargo xtask setup` installs it)");
        return;
    };
    let built = xtask_image();
    println!(
        "built {} id {} size {}",
        built.reference, built.id, built.size
    );
    assert_eq!(built.reference, image_ref());

    let listed = cmd::output(Command::new(&buildah).args(["images", "--json", &built.reference]))
        .expect("buildah images");
    let listed: Value = serde_json::from_str(&listed).expect("buildah images --json");
    let ids: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert!(
        ids.iter().any(|id| built.id.starts_with(id)),
        "buildah images lists {ids:?}, not the built {}",
        built.id
    );
    let inspect =
        cmd::output(Command::new(&buildah).args(["inspect", "--type", "image", &built.reference]))
            .expect("buildah inspect");
    let inspect: Value = serde_json::from_str(&inspect).expect("buildah inspect prints JSON");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["/lb-agent"]));
    assert_eq!(config["User"], "0:0");
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    // Take the binary out of the image, as a container would see it.
    let name = cmd::output(Command::new(&buildah).args(["from", "--pull=never", &built.reference]))
        .expect("buildah from")
        .trim()
        .to_owned();
    let container = WorkingContainer {
        buildah: buildah.clone(),
        name,
    };
    let root = PathBuf::from(
        cmd::output(Command::new(&buildah).args(["mount", &container.name]))
            .expect("buildah mount")
            .trim(),
    );
    let files: BTreeSet<String> = std::fs::read_dir(&root)
        .expect("read the image root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.contains("lb-agent"),
        "no /lb-agent in the image: {files:?}"
    );
    let work = tempfile::tempdir().expect("temp dir");
    let agent = work.path().join("lb-agent");
    std::fs::copy(root.join("lb-agent"), &agent).expect("copy /lb-agent out of the image");
    drop(container);

    assert_eq!(
        std::fs::read(&agent).expect("read the extracted agent"),
        std::fs::read(&built.binary).expect("read the built agent"),
        "the image holds another binary than the one built"
    );
    assert_eq!(
        lb_testkit::elf_interpreter(&agent).expect("the agent's ELF headers"),
        None,
        "lb-agent in the image is dynamically linked"
    );
    let help = cmd::output(Command::new(&agent).arg("--help")).expect("lb-agent --help");
    assert!(help.contains("run"), "unexpected --help output:\n{help}");
    println!("files in the image root: {files:?}");
}

/// `localhost/lb-agent:<workspace version>`, the tag `cargo xtask image`
/// gives and the DaemonSet names.
fn image_ref() -> String {
    format!("localhost/lb-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// What `cargo xtask image` says it built.
struct Built {
    reference: String,
    id: String,
    size: String,
    binary: PathBuf,
}

/// Runs `cargo xtask image` and reads its report (`image REF`, `id ID`,
/// `size SIZE`, `binary PATH (…)`).
fn xtask_image() -> Built {
    let out = cmd::output(
        cmd::cargo()
            .current_dir(lb_testkit::workspace_root())
            .args(["xtask", "image"]),
    )
    .unwrap_or_else(|e| panic!("cargo xtask image: {e:#}"));
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("`cargo xtask image` printed no `{name}` line:\n{out}"))
    };
    let binary = field("binary ");
    Built {
        reference: field("image "),
        id: field("id "),
        size: field("size "),
        binary: PathBuf::from(binary.split(" (").next().unwrap_or_default()),
    }
}

/// Capability numbers (`linux/capability.h`) of the names a manifest may
/// use.
const CAPABILITIES: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("NET_BIND_SERVICE", 10),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("SYS_PTRACE", 19),
    ("SYS_ADMIN", 21),
    ("SYS_RESOURCE", 24),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// The capabilities the DaemonSet adds (Kubernetes spelling: `NET_ADMIN`),
/// after checking that it drops all others.
fn daemonset_capabilities() -> Vec<String> {
    let c = agent_container();
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        serde_json::json!(["ALL"]),
        "{DAEMONSET} must drop ALL"
    );
    let add: Vec<String> = caps["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_owned())
        .collect();
    assert!(!add.is_empty(), "{DAEMONSET} adds no capability");
    add
}

/// The bit mask of a set of capability names.
fn mask(caps: &[String]) -> u64 {
    caps.iter()
        .map(|name| {
            let bare = name.strip_prefix("CAP_").unwrap_or(name);
            let (_, bit) = CAPABILITIES
                .iter()
                .find(|(n, _)| *n == bare)
                .unwrap_or_else(|| panic!("unknown capability {name} in {DAEMONSET}"));
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

/// The command that runs the agent as a container runtime would with
/// `privileged: false`, `capabilities: {drop: [ALL], add: caps}` and
/// `allowPrivilegeEscalation: false`: uid 0, bounding set `caps` (so
/// permitted and effective become `caps` at exec), no inheritable or
/// ambient capability, no_new_privs.
fn setpriv(caps: &[String]) -> Vec<String> {
    let bounding: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    vec![
        cmd::program("setpriv"),
        "--no-new-privs".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--ambient-caps=-all".to_owned(),
        format!("--bounding-set=-all{bounding}"),
        "--".to_owned(),
    ]
}

/// Starts the agent with `caps` only, pinning under `<lab bpffs>/<tag>`.
fn start_with_caps(lab: &Lab, caps: &[String], tag: &str) -> anyhow::Result<Agent> {
    let bin = lab::agent::binary()?;
    let manifests = lab.dir().join("services.yaml");
    let bpffs_root = lab.bpffs_root().join(tag);
    let log = lab.dir().join(format!("lb-agent-{tag}.log"));
    let wrapper = setpriv(caps);
    Agent::start(
        lab.node(),
        &AgentConfig {
            bin: &bin,
            interfaces: &[lab::NODE_IFACE],
            source: AgentSource::Manifests(&manifests),
            extra_args: &[],
            node_name: manifest::NODE_NAME,
            bpffs_root: &bpffs_root,
            log: &log,
            wrapper: &wrapper,
        },
    )
}

/// A `Cap*:` mask of `/proc/<pid>/status`.
fn proc_caps(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("a hex capability mask")
}

/// Builds a lab with `pods` pods and the manifest for them, or skips.
fn lab_or_skip(test: &str, pods: u8) -> Option<Lab> {
    if !root_or_skip(test) {
        return None;
    }
    if cmd::find_program("setpriv").is_none() {
        skip(
            test,
            "`setpriv` is missing (util-linux); run `cargo xtask setup`",
        );
        return None;
    }
    let lab = Lab::new(pods).unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}"));
    let all: Vec<u8> = (1..=pods).collect();
    lab.write_manifest(&all).expect("write the manifest");
    Some(lab)
}

/// With exactly the DaemonSet's capabilities the agent loads, attaches,
/// serves the NodePort over TCP and UDP, and stops cleanly.
#[test]
fn agent_runs_with_minimal_capabilities() {
    const TEST: &str = "agent_runs_with_minimal_capabilities";
    let caps = daemonset_capabilities();
    let Some(lab) = lab_or_skip(TEST, 2) else {
        return;
    };
    // Declared after the lab: dropped (stopped) before it.
    let mut agent = start_with_caps(&lab, &caps, "minimal")
        .unwrap_or_else(|e| panic!("lb-agent with only {caps:?}: {e:#}"));
    let pid = agent.pid().expect("agent pid");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("agent exe");
    assert!(exe.ends_with("lb-agent"), "pid {pid} is {}", exe.display());
    let effective = proc_caps(pid, "CapEff");
    assert_eq!(
        effective,
        mask(&caps),
        "the agent's effective capabilities {effective:#x} are not exactly {caps:?}"
    );
    assert_eq!(proc_caps(pid, "CapBnd"), mask(&caps), "bounding set");
    println!("lb-agent (pid {pid}) runs with CapEff {effective:#x} = {caps:?}");

    let frontend: SocketAddr = lab::frontend();
    let tcp = lab
        .in_client(move || Tally::collect(40, || client::http_get(frontend)))
        .expect("client thread");
    let udp = lab
        .in_client(move || Tally::collect(40, || client::udp_ask(frontend)))
        .expect("client thread");
    println!("TCP {tcp}\nUDP {udp}");
    for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
        assert!(
            tally.errors.is_empty() && tally.answered() == 40,
            "{proto} through the NodePort: {tally}"
        );
        for i in [1, 2] {
            assert!(
                tally.count(&lab::pod_label(i)) > 0,
                "{proto}: pod-{i} never answered: {tally}"
            );
        }
    }

    let status = agent.stop().expect("stop the agent");
    assert!(
        status.is_some_and(|s| s.success()),
        "lb-agent did not exit cleanly on SIGTERM ({status:?}); log:\n{}",
        agent.log()
    );
}

/// Without any one of the DaemonSet's capabilities the agent fails to start
/// with an error (so every capability in the manifest is needed).
#[test]
fn agent_fails_without_each_capability() {
    const TEST: &str = "agent_fails_without_each_capability";
    let caps = daemonset_capabilities();
    let Some(lab) = lab_or_skip(TEST, 1) else {
        return;
    };
    let mut unneeded = Vec::new();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let tag = format!("without-{}", missing.to_lowercase());
        match start_with_caps(&lab, &fewer, &tag) {
            Ok(mut agent) => {
                let _ = agent.stop();
                unneeded.push(missing.clone());
            }
            Err(e) => {
                let message = format!("{e:#}");
                assert!(
                    message.contains("exited"),
                    "without {missing}: the agent did not exit but: {message}"
                );
                let error = message
                    .lines()
                    .find(|l| l.contains("Error:"))
                    .unwrap_or_else(|| {
                        panic!("without {missing}: the agent exited without an error:\n{message}")
                    });
                println!("without {missing}: {error}");
            }
        }
    }
    assert!(
        unneeded.is_empty(),
        "lb-agent started without {unneeded:?}: remove them from {DAEMONSET}"
    );
}
