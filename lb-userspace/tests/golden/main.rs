//! Golden packets through BPF_PROG_TEST_RUN on the real XDP and TC programs.
//!
//! The maps are filled by the agent's own pipeline (manifest → translate →
//! plan → `KernelMaps`), and each expected packet is built independently
//! with etherparse (which computes its own checksums), so a byte-for-byte
//! match proves the rewrite and both checksums. The backend a new flow must
//! get comes from the host reference (`MemoryMaps::resolve` with the shared
//! flow hash), so kernel and host agree on Maglev.
//!
//! Needs root and a BPF-capable kernel: run with `--test-threads=1`
//! (`cargo xtask test` does).

use std::{collections::BTreeSet, net::Ipv4Addr, path::PathBuf};

use aya::{
    TestRun,
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRunOptions, TestRunResult, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{
    BACKEND_ACTIVE, CT_DIR_FORWARD, CT_DIR_REPLY, CtKeyV4, CtValueV4, FrontendKeyV4, IPPROTO_TCP,
    IPPROTO_UDP, REASON_AFFINITY, REASON_LEAST_CONN, REASON_MAGLEV, REASON_REBALANCED,
    REASON_ROUND_ROBIN, Stats, flow, hash::flow_hash_v4, pin,
};
use lb_userspace::{
    loader::{
        Datapath, IngressHook, LoadOptions, TC_INGRESS_PROGRAM, TC_PROGRAM, XDP_PROGRAM,
        close_with, program,
    },
    pinned,
    plan::{PlanConfig, plan},
    source::manifests,
    translate::{NodeContext, translate},
    writer::{MapWriter, kernel::KernelMaps, memory::MemoryMaps},
};

use lb_testkit::fixtures::{
    self, CLIENT, MAC_A, MAC_B, NODE, Program, TC_ACT_OK, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS,
    XDP_TX, tcp, udp,
};
use lb_testkit::topology::Site;

mod admission;
mod dnat;
mod flow_state;
mod forward;
mod icmp;
mod policies;
mod reject;

const SNAT_LO: u16 = 61_000;

/// Root, or a loud failure under CI / a loud skip elsewhere.
fn privileged() -> bool {
    lb_testkit::guard::can_run_as_root("golden tests")
}

fn manifest(endpoints: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "    - addresses: [\"{ip}\"]\n      conditions: {{ready: true}}\n      nodeName: node-a\n      targetRef: {{kind: Pod, name: pod-{i}, namespace: demo}}\n"
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: echo, namespace: demo}}
  spec:
    type: NodePort
    clusterIP: 10.96.0.10
    ports:
    - {{name: http, protocol: TCP, port: 80, nodePort: 30090, targetPort: web}}
    - {{name: dns, protocol: UDP, port: 80, nodePort: 30090, targetPort: 8053}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: echo-abc12
    namespace: demo
    labels: {{kubernetes.io/service-name: echo}}
  addressType: IPv4
  ports:
  - {{name: http, protocol: TCP, port: 8080}}
  - {{name: dns, protocol: UDP, port: 8053}}
  endpoints:
{eps}{OTHER_SERVICES}"#
    )
}

/// Services beside `demo/echo`: a LoadBalancer with ClientIP affinity (2 s)
/// and source ranges, a service with no endpoint (rejects), and an
/// `externalTrafficPolicy: Local` one whose only endpoint is on another node
/// (drops).
const OTHER_SERVICES: &str = r#"- apiVersion: v1
  kind: Service
  metadata:
    name: rr
    namespace: demo
    annotations: {lb-agent.dev/balancing: round-robin}
  spec:
    type: NodePort
    clusterIP: 10.96.0.15
    ports:
    - {name: t, protocol: TCP, port: 80, nodePort: 30300, targetPort: 8080}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: rr-x1
    namespace: demo
    labels: {kubernetes.io/service-name: rr}
  addressType: IPv4
  ports: [{name: t, protocol: TCP, port: 8080}]
  endpoints:
  - {addresses: ["198.18.3.13"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.3.11"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.3.12"], conditions: {ready: true}, nodeName: node-a}
- apiVersion: v1
  kind: Service
  metadata:
    name: lc
    namespace: demo
    annotations: {lb-agent.dev/balancing: least-connection}
  spec:
    type: NodePort
    clusterIP: 10.96.0.16
    ports:
    - {name: t, protocol: TCP, port: 80, nodePort: 30301, targetPort: 8080}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: lc-x1
    namespace: demo
    labels: {kubernetes.io/service-name: lc}
  addressType: IPv4
  ports: [{name: t, protocol: TCP, port: 8080}]
  endpoints:
  - {addresses: ["198.18.4.11"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.4.12"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.4.13"], conditions: {ready: true}, nodeName: node-a}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: demo}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.11
    sessionAffinity: ClientIP
    sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
    loadBalancerSourceRanges: ["198.18.0.0/30"]
    ports:
    - {name: http, protocol: TCP, port: 80, nodePort: 30100, targetPort: 8080}
  status: {loadBalancer: {ingress: [{ip: 198.18.100.1}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: web-x1
    namespace: demo
    labels: {kubernetes.io/service-name: web}
  addressType: IPv4
  ports: [{name: http, protocol: TCP, port: 8080}]
  endpoints:
  - {addresses: ["198.18.1.21"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.1.22"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.1.23"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["198.18.1.24"], conditions: {ready: true}, nodeName: node-a}
- apiVersion: v1
  kind: Service
  metadata: {name: remote, namespace: demo}
  spec:
    type: NodePort
    clusterIP: 10.96.0.14
    ports:
    - {name: t, protocol: TCP, port: 80, nodePort: 30200, targetPort: 8080}
    - {name: u, protocol: UDP, port: 80, nodePort: 30200, targetPort: 8080}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: remote-x1
    namespace: demo
    labels: {kubernetes.io/service-name: remote}
  addressType: IPv4
  ports: [{name: t, protocol: TCP, port: 8080}, {name: u, protocol: UDP, port: 8080}]
  endpoints:
  - {addresses: ["198.18.2.11"], conditions: {ready: true}, nodeName: node-b}
- apiVersion: v1
  kind: Service
  metadata: {name: empty, namespace: demo}
  spec:
    type: NodePort
    clusterIP: 10.96.0.12
    ports:
    - {name: t, protocol: TCP, port: 80, nodePort: 30091, targetPort: 8080}
    - {name: u, protocol: UDP, port: 80, nodePort: 30091, targetPort: 8080}
- apiVersion: v1
  kind: Service
  metadata: {name: local, namespace: demo}
  spec:
    type: NodePort
    clusterIP: 10.96.0.13
    externalTrafficPolicy: Local
    ports:
    - {name: t, protocol: TCP, port: 80, nodePort: 30092, targetPort: 8080}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: local-x1
    namespace: demo
    labels: {kubernetes.io/service-name: local}
  addressType: IPv4
  ports: [{name: t, protocol: TCP, port: 8080}]
  endpoints:
  - {addresses: ["198.18.9.9"], conditions: {ready: true}, nodeName: node-b}
"#;

struct Golden {
    dp: Datapath,
    maps: KernelMaps,
    memory: MemoryMaps,
    /// The planner's settings: tables of 251 slots unless a test says.
    cfg: PlanConfig,
    /// The pin directory (removed on drop) and a temporary directory.
    site: Site,
}

impl Golden {
    fn new(endpoints: &[&str]) -> Self {
        Self::with_config(PlanConfig::new(251).expect("a prime"), endpoints)
    }

    /// As [`Golden::new`], planning with `cfg`.
    fn with_config(cfg: PlanConfig, endpoints: &[&str]) -> Self {
        let site = Site::new("g").expect("a site for the pins");
        let mut dp = Datapath::load(&LoadOptions {
            bpffs_root: site.pins().to_owned(),
            ct_capacity: 4096,
        })
        .expect("load datapath");
        for hook in [IngressHook::Xdp, IngressHook::Tc] {
            dp.load_ingress(hook).expect("load the ingress program");
        }
        let maps = KernelMaps::from_ebpf(&mut dp.ebpf).expect("maps");
        dp.configure(&lb_common::DatapathConfig {
            snat_addr: NODE,
            snat_port_lo: SNAT_LO,
            snat_port_hi: SNAT_LO + 3,
        })
        .expect("configure SNAT");
        let mut g = Self {
            dp,
            maps,
            memory: MemoryMaps::default(),
            cfg,
            site,
        };
        g.set_endpoints(endpoints);
        g
    }

    /// Writes the manifest and runs the agent's pipeline into both the kernel
    /// maps and the host reference maps.
    fn set_endpoints(&mut self, endpoints: &[&str]) {
        self.set_manifest(&manifest(endpoints));
    }

    /// Runs the pipeline on `text`, as [`Golden::set_endpoints`].
    fn set_manifest(&mut self, text: &str) {
        let file = self.site.dir().join("svc.yaml");
        std::fs::write(&file, text).unwrap();
        let objects = manifests::load(&file).expect("manifest");
        let node = NodeContext {
            node_name: "node-a".into(),
            node_addrs: vec![Ipv4Addr::from(NODE)],
        };
        let desired = translate(&objects, &node).expect("translate").desired;
        let current = self.maps.read_state().expect("read state");
        let ops = plan(&current, &desired, &self.cfg).expect("plan");
        self.maps.apply(&ops).expect("apply");
        self.memory.apply(&ops).expect("apply to memory");
        assert_eq!(
            self.maps.read_state().unwrap(),
            self.memory.read_state().unwrap()
        );
    }

    fn xdp(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = program(&mut self.dp.ebpf, XDP_PROGRAM).unwrap();
        run(prog, pkt)
    }

    /// XDP with `ctx.ingress_ifindex = ifindex` (the interface of the caller's
    /// network namespace that `bpf_fib_lookup` starts from).
    fn xdp_on(&mut self, pkt: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = program(&mut self.dp.ebpf, XDP_PROGRAM).unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let md: Vec<u8> = [0, pkt.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// The ingress logic at TC ingress (`lb_tc_ingress`).
    fn tc_ingress(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = program(&mut self.dp.ebpf, TC_INGRESS_PROGRAM).unwrap();
        run(prog, pkt)
    }

    /// The ingress logic at hook `at`, its verdict as XDP's (TC's
    /// `TC_ACT_OK` is a pass, `TC_ACT_SHOT` a drop, `TC_ACT_REDIRECT` a
    /// packet sent out, as `XDP_TX`).
    fn ingress(&mut self, at: IngressHook, pkt: &[u8]) -> (u32, Vec<u8>) {
        match at {
            IngressHook::Xdp => self.xdp(pkt),
            IngressHook::Tc => {
                let (v, out) = self.tc_ingress(pkt);
                let v = match v {
                    0 => XDP_PASS,
                    2 => XDP_DROP,
                    7 => XDP_TX,
                    other => panic!("TC ingress verdict {other}"),
                };
                (v, out)
            }
        }
    }

    fn tc(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = program(&mut self.dp.ebpf, TC_PROGRAM).unwrap();
        run(prog, pkt)
    }

    /// Where the maps are pinned.
    fn pins(&self) -> PathBuf {
        lb_userspace::loader::pin_dir(self.site.pins())
    }

    fn stats(&self) -> Stats {
        let m = pinned::per_cpu_array::<Stats>(&self.pins(), pin::STATS).unwrap();
        let mut s = Stats::default();
        for c in m.get(&0, 0).unwrap().iter() {
            s.add(c);
        }
        s
    }

    fn open_flows(&self) -> Array<MapData, u64> {
        pinned::array(&self.pins(), pin::BACKEND_OPEN_FLOWS).unwrap()
    }

    /// The conntrack map.
    fn conntrack(&self) -> HashMap<MapData, CtKeyV4, CtValueV4> {
        pinned::hash(&self.pins(), pin::CONNTRACK_V4).unwrap()
    }

    /// The backend id of `addr` (TCP port 8080 when it has several) in the maps.
    fn backend_id(&self, addr: [u8; 4]) -> u32 {
        *self
            .memory
            .backends
            .iter()
            .find(|(_, b)| b.addr == addr && u16::from_be(b.port_be) == 8080)
            .expect("backend in the maps")
            .0
    }

    /// Open flows counted on the backend at `addr`.
    fn open_of(&self, addr: [u8; 4]) -> u64 {
        self.open_flows().get(&self.backend_id(addr), 0).unwrap()
    }

    fn set_open(&self, addr: [u8; 4], n: u64) {
        let id = self.backend_id(addr);
        self.open_flows().set(id, n, 0).unwrap();
    }

    fn ct(&self, key: &CtKeyV4) -> Option<CtValueV4> {
        self.conntrack().get(key, 0).ok()
    }

    /// The backend the host reference picks for a new flow.
    fn expected_backend(&self, sport: u16, dport: u16, proto: u8) -> ([u8; 4], u16) {
        let key = FrontendKeyV4 {
            addr: NODE,
            port_be: dport.to_be(),
            proto,
            _pad: 0,
        };
        let h = flow_hash_v4(CLIENT, NODE, sport.to_be(), dport.to_be(), proto);
        let be = self
            .memory
            .resolve(&key, h)
            .expect("reference picks a backend");
        assert_eq!(be.state, BACKEND_ACTIVE);
        (be.addr, u16::from_be(be.port_be))
    }
}

fn run<P>(prog: &mut P, pkt: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

const PODS: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.1.13"];

/// Every row of the fixture table the per-packet bench times, in order:
/// the verdict, the output bytes and the counter of each.
#[test]
fn every_row_of_the_shared_fixture_table() {
    fixture_table(IngressHook::Xdp);
}

/// The same rows with the ingress logic at TC ingress: the same verdicts
/// (as TC's), bytes and counters.
#[test]
fn every_row_of_the_shared_fixture_table_at_tc_ingress() {
    fixture_table(IngressHook::Tc);
}

fn fixture_table(at: IngressHook) {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let client = (CLIENT, fixtures::CLIENT_PORT);
    let frontend = (NODE, 30090);
    let backend = g.expected_backend(client.1, frontend.1, IPPROTO_TCP);
    for row in fixtures::flow(client, frontend, backend) {
        let before = g.stats();
        let (verdict, out) = match row.program {
            Program::Xdp => g.ingress(at, &row.packet),
            Program::Tc => g.tc(&row.packet),
        };
        assert_eq!(verdict, row.verdict, "{}: {}", row.name, row.what);
        assert_eq!(out, row.output, "{}: {}", row.name, row.what);
        assert_eq!(
            (row.counter)(&g.stats()) - (row.counter)(&before),
            1,
            "{}: its counter",
            row.name
        );
    }
}

/// Runs `f` on a thread in a fresh network namespace holding `v0`
/// (198.18.0.1/24, MAC 02:00:00:00:00:0a) with permanent neighbours for the client
/// (MAC_A) and node B (198.18.0.3, NODE_B_MAC) and a route to node B's pods,
/// so that `bpf_fib_lookup` succeeds. Returns `f`'s result; the namespace
/// and its veths vanish with the thread.
fn in_fib_netns<T: Send>(f: impl FnOnce(u32, [u8; 6]) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let ip = |args: &str| {
                let st = std::process::Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .expect("ip");
                assert!(st.success(), "ip {args}");
            };
            // bpf_fib_lookup answers only where forwarding is on.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
            ip("link add v0 type veth peer name v1");
            ip("link set v0 address 02:00:00:00:00:0a");
            ip("addr add 198.18.0.1/24 dev v0");
            ip("link set v0 up");
            ip("link set v1 up");
            ip("neigh add 198.18.0.2 lladdr 02:00:00:00:00:01 dev v0 nud permanent");
            ip("neigh add 198.18.0.3 lladdr 02:00:00:00:00:03 dev v0 nud permanent");
            ip("route add 198.18.2.0/24 via 198.18.0.3 dev v0");
            let ifindex = nix::net::if_::if_nametoindex("v0").expect("v0");
            f(ifindex, [2, 0, 0, 0, 0, 0x0a])
        })
        .join()
        .expect("netns thread")
    })
}

/// A pod of node B (the forwarded flows' backend).
const POD_B: [u8; 4] = [198, 18, 2, 11];

/// A TCP segment with FIN (and ACK) or RST set.
fn tcp_end(src: ([u8; 4], u16), dst: ([u8; 4], u16), rst: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 2000, 64240);
    let b = if rst { b.rst() } else { b.fin().ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, b"").unwrap();
    v
}

/// The backend a DNAT'd packet was sent to.
fn dnat_target(out: &[u8]) -> [u8; 4] {
    out[30..34].try_into().unwrap()
}
