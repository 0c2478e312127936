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

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use aya::{
    TestRun,
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRunOptions, TestRunResult, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{
    BACKEND_ACTIVE, CT_DIR_FORWARD, CT_DIR_REPLY, CtKeyV4, CtValueV4, FrontendKeyV4, IPPROTO_TCP,
    IPPROTO_UDP, REASON_AFFINITY, REASON_LEAST_CONN, REASON_MAGLEV, REASON_REBALANCED,
    REASON_ROUND_ROBIN, Stats, hash::flow_hash_v4, pin,
};
use lb_userspace::{
    loader::{Datapath, LoadOptions, TC_PROGRAM, XDP_PROGRAM, close_with, program},
    pinned,
    plan::{PlanConfig, plan},
    source::manifests,
    translate::{NodeContext, translate},
    writer::{MapWriter, kernel::KernelMaps, memory::MemoryMaps},
};

mod flow_state;
mod icmp;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const SNAT_LO: u16 = 61_000;
const TC_ACT_OK: u32 = 0;
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1

const NODE: [u8; 4] = [198, 18, 0, 1];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

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
    root: PathBuf,
    dir: tempfile::TempDir,
}

impl Golden {
    fn new(endpoints: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = PathBuf::from(format!("/sys/fs/bpf/lb-golden-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut dp = Datapath::load(&LoadOptions {
            bpffs_root: root.clone(),
            ct_capacity: 4096,
        })
        .expect("load datapath");
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
            root,
            dir: tempfile::tempdir().unwrap(),
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
        let file = self.dir.path().join("svc.yaml");
        std::fs::write(&file, text).unwrap();
        let objects = manifests::load(&file).expect("manifest");
        let node = NodeContext {
            node_name: "node-a".into(),
            node_addrs: vec![Ipv4Addr::from(NODE)],
        };
        let desired = translate(&objects, &node).expect("translate").desired;
        let current = self.maps.read_state().expect("read state");
        let ops = plan(&current, &desired, &PlanConfig { maglev_size: 251 }).expect("plan");
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

    fn tc(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = program(&mut self.dp.ebpf, TC_PROGRAM).unwrap();
        run(prog, pkt)
    }

    /// Where the maps are pinned.
    fn pins(&self) -> PathBuf {
        self.root.join(format!("v{}", lb_common::MAP_VERSION))
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

impl Drop for Golden {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
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

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut v, payload)
        .unwrap();
    v
}

const PODS: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.1.13"];

#[test]
fn tcp_syn_is_dnated_to_the_maglev_backend_with_valid_checksums() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let before = g.stats();
    let input = tcp((CLIENT, 40_000), (NODE, 30090), true, b"");
    let (verdict, out) = g.xdp(&input);
    assert_eq!(verdict, XDP_PASS);
    let be = g.expected_backend(40_000, 30090, IPPROTO_TCP);
    assert_eq!(be.1, 8080);
    assert_eq!(
        out,
        tcp((CLIENT, 40_000), be, true, b""),
        "DNAT'd SYN differs from the golden packet"
    );

    // Both conntrack entries are there, with the reason.
    let fwd = g
        .ct(&CtKeyV4 {
            src_addr: CLIENT,
            dst_addr: NODE,
            src_port_be: 40_000u16.to_be(),
            dst_port_be: 30090u16.to_be(),
            proto: IPPROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        })
        .expect("forward conntrack entry");
    assert_eq!(fwd.reason, REASON_MAGLEV);
    assert_eq!((fwd.nat_addr, u16::from_be(fwd.nat_port_be)), be);
    let rev = g
        .ct(&CtKeyV4 {
            src_addr: be.0,
            dst_addr: CLIENT,
            src_port_be: be.1.to_be(),
            dst_port_be: 40_000u16.to_be(),
            proto: IPPROTO_TCP,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        })
        .expect("reply conntrack entry");
    assert_eq!((rev.nat_addr, u16::from_be(rev.nat_port_be)), (NODE, 30090));
    let after = g.stats();
    assert_eq!(after.new_flows - before.new_flows, 1);

    // The next packet of the flow is an established hit, same backend.
    let data = tcp(
        (CLIENT, 40_000),
        (NODE, 30090),
        false,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let (verdict, out) = g.xdp(&data);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        tcp((CLIENT, 40_000), be, false, b"GET / HTTP/1.1\r\n\r\n")
    );
    assert_eq!(g.stats().established - after.established, 1);
}

#[test]
fn udp_is_dnated_and_a_zero_checksum_stays_zero() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let input = udp((CLIENT, 5353), (NODE, 30090), b"hello");
    let (verdict, out) = g.xdp(&input);
    assert_eq!(verdict, XDP_PASS);
    let be = g.expected_backend(5353, 30090, IPPROTO_UDP);
    assert_eq!(be.1, 8053);
    assert_eq!(out, udp((CLIENT, 5353), be, b"hello"));

    // Same flow, checksum 0 ("none"): must stay 0, IPv4 checksum still right.
    let mut zero = udp((CLIENT, 5353), (NODE, 30090), b"again");
    zero[40..42].copy_from_slice(&[0, 0]);
    let (verdict, out) = g.xdp(&zero);
    assert_eq!(verdict, XDP_PASS);
    let mut expect = udp((CLIENT, 5353), be, b"again");
    expect[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(out, expect);
}

#[test]
fn non_service_and_malformed_packets_pass_untouched_and_are_counted() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();

    // TCP to a port with no service.
    let other = tcp((CLIENT, 40_001), (NODE, 9000), true, b"");
    assert_eq!(g.xdp(&other), (XDP_PASS, other.clone()));
    // ICMP echo.
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, NODE, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    assert_eq!(g.xdp(&icmp), (XDP_PASS, icmp.clone()));
    // ARP-like non-IPv4 frame.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(g.xdp(&arp), (XDP_PASS, arp.clone()));
    // Truncated: a service SYN cut inside the TCP header.
    let syn = tcp((CLIENT, 40_002), (NODE, 30090), true, b"");
    let cut = syn[..40].to_vec();
    assert_eq!(g.xdp(&cut), (XDP_PASS, cut.clone()));
    // IPv4 options (IHL 6): a service SYN with 4 bytes of NOP options.
    let mut opts = syn[..34].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 0]);
    opts.extend_from_slice(&syn[34..]);
    opts[14] = 0x46;
    opts[17] += 4; // total length
    assert_eq!(g.xdp(&opts), (XDP_PASS, opts.clone()));
    // Fragment: MF set on a service packet.
    let mut frag = syn.clone();
    frag[20] |= 0x20;
    assert_eq!(g.xdp(&frag), (XDP_PASS, frag.clone()));

    let s = g.stats();
    assert_eq!(s.pass_not_service - s0.pass_not_service, 1);
    assert_eq!(s.pass_other_proto - s0.pass_other_proto, 1);
    assert_eq!(s.pass_not_ipv4 - s0.pass_not_ipv4, 1);
    assert_eq!(s.pass_truncated - s0.pass_truncated, 1);
    assert_eq!(s.pass_ip_options - s0.pass_ip_options, 1);
    assert_eq!(s.pass_fragment - s0.pass_fragment, 1);
    assert_eq!(
        s.new_flows, s0.new_flows,
        "no malformed packet may create a flow"
    );
}

#[test]
fn tc_rewrites_the_reply_source_back_to_the_frontend() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let syn = tcp((CLIENT, 40_003), (NODE, 30090), true, b"");
    assert_eq!(g.xdp(&syn).0, XDP_PASS);
    let be = g.expected_backend(40_003, 30090, IPPROTO_TCP);

    let reply = tcp(be, (CLIENT, 40_003), false, b"HTTP/1.1 200 OK\r\n\r\npod");
    let (verdict, out) = g.tc(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(
            (NODE, 30090),
            (CLIENT, 40_003),
            false,
            b"HTTP/1.1 200 OK\r\n\r\npod"
        )
    );

    // UDP reply too.
    let q = udp((CLIENT, 5400), (NODE, 30090), b"q");
    assert_eq!(g.xdp(&q).0, XDP_PASS);
    let ube = g.expected_backend(5400, 30090, IPPROTO_UDP);
    let (verdict, out) = g.tc(&udp(ube, (CLIENT, 5400), b"pod-1"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp((NODE, 30090), (CLIENT, 5400), b"pod-1"));

    // A packet of no tracked flow continues untouched.
    let stray = tcp(([198, 18, 1, 99], 8080), (CLIENT, 40_003), false, b"x");
    assert_eq!(g.tc(&stray), (TC_ACT_UNSPEC, stray.clone()));
}

#[test]
fn flow_is_rebalanced_when_its_backend_is_removed() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let syn = tcp((CLIENT, 40_004), (NODE, 30090), true, b"");
    g.xdp(&syn);
    let be = g.expected_backend(40_004, 30090, IPPROTO_TCP);
    let gone = Ipv4Addr::from(be.0).to_string();
    let rest: Vec<&str> = PODS.iter().copied().filter(|p| *p != gone).collect();
    g.set_endpoints(&rest);

    let s0 = g.stats();
    let data = tcp((CLIENT, 40_004), (NODE, 30090), false, b"more");
    let (verdict, out) = g.xdp(&data);
    assert_eq!(verdict, XDP_PASS);
    let now = g.expected_backend(40_004, 30090, IPPROTO_TCP);
    assert_ne!(now.0, be.0);
    assert_eq!(out, tcp((CLIENT, 40_004), now, false, b"more"));
    assert_eq!(g.stats().rebalanced - s0.rebalanced, 1);
    let fwd = g
        .ct(&CtKeyV4 {
            src_addr: CLIENT,
            dst_addr: NODE,
            src_port_be: 40_004u16.to_be(),
            dst_port_be: 30090u16.to_be(),
            proto: IPPROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        })
        .unwrap();
    assert_eq!(fwd.reason, REASON_REBALANCED);

    // Flows pinned to the surviving backends keep them: add a fourth pod and
    // check an established flow does not move even if Maglev would move it.
    let mut pinned = BTreeSet::new();
    for port in 41_000..41_030u16 {
        g.xdp(&tcp((CLIENT, port), (NODE, 30090), true, b""));
        pinned.insert((port, g.expected_backend(port, 30090, IPPROTO_TCP)));
    }
    let mut four = rest.clone();
    four.push("198.18.1.14");
    g.set_endpoints(&four);
    for (port, be) in pinned {
        let (_, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30090), false, b"x"));
        assert_eq!(
            out,
            tcp((CLIENT, port), be, false, b"x"),
            "flow from port {port} moved"
        );
    }
}

/// Parses an answer built by the datapath and checks both checksums.
fn parse_answer(out: &[u8]) -> etherparse::SlicedPacket<'_> {
    let p = etherparse::SlicedPacket::from_ethernet(out).expect("a well-formed answer");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("answer is not IPv4");
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
    assert_eq!(h.time_to_live, 64);
    p
}

#[test]
fn tcp_to_a_service_without_endpoints_is_answered_with_rst() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let syn = tcp((CLIENT, 40_100), (NODE, 30091), true, b"");
    let (verdict, out) = g.xdp(&syn);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 54);
    let p = parse_answer(&out);
    let eth = p.link.as_ref().unwrap().to_header();
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = eth else {
        panic!("not Ethernet II")
    };
    assert_eq!((eth.source, eth.destination), (MAC_B, MAC_A));
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        unreachable!()
    };
    assert_eq!(ip.header().source(), NODE);
    assert_eq!(ip.header().destination(), CLIENT);
    let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert_eq!((t.source_port(), t.destination_port()), (30091, 40_100));
    assert!(t.rst() && t.ack() && !t.syn());
    assert_eq!(
        t.acknowledgment_number(),
        1001,
        "ACKs the SYN (seq 1000 + 1)"
    );
    assert_eq!(t.sequence_number(), 0);
    let th = t.to_header();
    assert_eq!(
        th.checksum,
        th.calc_checksum_ipv4(&ip.header().to_header(), &[])
            .unwrap(),
        "TCP checksum"
    );

    // A segment with ACK gets a bare RST whose sequence is that ACK.
    let data = tcp((CLIENT, 40_101), (NODE, 30091), false, b"hello");
    let (verdict, out) = g.xdp(&data);
    assert_eq!(verdict, XDP_TX);
    let p = parse_answer(&out);
    let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert!(t.rst() && !t.ack());
    assert_eq!(t.sequence_number(), 1, "seq = the segment's ACK");

    // A RST is never answered.
    let mut rst = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, NODE, 64)
        .tcp(40_102, 30091, 5, 0)
        .rst()
        .write(&mut rst, b"")
        .unwrap();
    assert_eq!(g.xdp(&rst).0, XDP_DROP);

    let s = g.stats();
    assert_eq!(s.reject_tcp - s0.reject_tcp, 2);
    assert_eq!(s.new_flows, s0.new_flows);
}

#[test]
fn udp_to_a_service_without_endpoints_gets_icmp_port_unreachable() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let input = udp((CLIENT, 5000), (NODE, 30091), b"is anyone there?");
    let (verdict, out) = g.xdp(&input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + 8);
    let p = parse_answer(&out);
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        unreachable!()
    };
    assert_eq!(
        ip.header().source(),
        NODE,
        "from the address the client used"
    );
    assert_eq!(ip.header().destination(), CLIENT);
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not ICMP")
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 3), "port unreachable");
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    assert_eq!(
        icmp.payload(),
        &input[14..42],
        "quotes the IPv4 header and 8 bytes"
    );
    assert_eq!(g.stats().reject_udp, 1);
}

#[test]
fn source_ranges_admit_listed_clients_on_loadbalancer_ips_only() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let lb = [198, 18, 100, 1];
    let outsider = [198, 18, 0, 9];
    let (verdict, out) = g.xdp(&tcp((CLIENT, 40_200), (lb, 80), true, b""));
    assert_eq!(verdict, XDP_PASS);
    assert_ne!(out[30..34], lb, "DNAT'd to a pod");

    let s0 = g.stats();
    let denied = tcp((outsider, 40_201), (lb, 80), true, b"");
    assert_eq!(g.xdp(&denied), (XDP_DROP, denied.clone()));
    assert_eq!(g.stats().drop_source_range - s0.drop_source_range, 1);

    // The NodePort of the same service is not restricted (kube-proxy).
    let (verdict, out) = g.xdp(&tcp((outsider, 40_202), (NODE, 30100), true, b""));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out[36..38], 8080u16.to_be_bytes());
}

#[test]
fn client_ip_affinity_holds_for_the_timeout_then_expires() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let lb = [198, 18, 100, 1];
    let key = |port: u16| CtKeyV4 {
        src_addr: CLIENT,
        dst_addr: lb,
        src_port_be: port.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    g.xdp(&tcp((CLIENT, 42_000), (lb, 80), true, b""));
    let first = g.ct(&key(42_000)).unwrap();
    assert_eq!(first.reason, REASON_MAGLEV);
    // 40 more flows from other ports: all on the same pod, by affinity.
    for port in 42_001..42_041u16 {
        let (_, out) = g.xdp(&tcp((CLIENT, port), (lb, 80), true, b""));
        assert_eq!(
            out[30..34],
            first.nat_addr,
            "flow from port {port} left the pod"
        );
        assert_eq!(g.ct(&key(port)).unwrap().reason, REASON_AFFINITY);
    }
    // Without affinity these 41 flows would have spread over 4 pods.
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    g.xdp(&tcp((CLIENT, 42_100), (lb, 80), true, b""));
    assert_eq!(
        g.ct(&key(42_100)).unwrap().reason,
        REASON_MAGLEV,
        "affinity expired"
    );
}

#[test]
fn etp_local_without_local_endpoint_drops() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let syn = tcp((CLIENT, 40_300), (NODE, 30092), true, b"");
    assert_eq!(g.xdp(&syn), (XDP_DROP, syn.clone()));
    assert_eq!(g.stats().drop_no_backend, 1);
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

const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const POD_B: [u8; 4] = [198, 18, 2, 11];

/// The packet as it must leave node A: new MACs and addresses, TTL 63.
fn tcp_out(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, 63)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

#[test]
fn remote_backend_gets_dnat_snat_and_xdp_tx_and_the_reply_is_translated_back() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let syn = tcp((CLIENT, 40_500), (NODE, 30200), true, b"");
    let (syn_out, reply_out, node_mac) = in_fib_netns(|ifindex, node_mac| {
        let syn_out = g.xdp_on(&syn, ifindex);
        // The port the datapath reserved is in the first 4 of the range.
        let port = u16::from_be_bytes([syn_out.1[34], syn_out.1[35]]);
        assert!((SNAT_LO..SNAT_LO + 4).contains(&port), "SNAT port {port}");
        let reply = tcp((POD_B, 8080), (NODE, port), false, b"pod-b1\n");
        let reply_out = g.xdp_on(&reply, ifindex);
        (syn_out, reply_out, node_mac)
    });
    // Forward: DNAT to the pod on node B, SNAT to this node, TTL 63, MACs
    // from the FIB, back out of the same interface.
    assert_eq!(syn_out.0, XDP_TX);
    let port = u16::from_be_bytes([syn_out.1[34], syn_out.1[35]]);
    assert_eq!(
        syn_out.1,
        tcp_out(
            (node_mac, NODE_B_MAC),
            (NODE, port),
            (POD_B, 8080),
            true,
            b""
        ),
        "DNAT+SNAT'd SYN differs from the golden packet (bytes or checksums)"
    );
    // Reply: source back to the frontend, destination back to the client.
    assert_eq!(reply_out.0, XDP_TX);
    assert_eq!(
        reply_out.1,
        tcp_out(
            (node_mac, MAC_A),
            (NODE, 30200),
            (CLIENT, 40_500),
            false,
            b"pod-b1\n"
        ),
        "reverse-SNAT'd reply differs from the golden packet"
    );
    let s = g.stats();
    assert_eq!(s.forwarded - s0.forwarded, 1);
    assert_eq!(s.reverse_snat - s0.reverse_snat, 1);
    // The mapping is in LB_NAT_V4, and the flow's conntrack entry says SNAT.
    let fwd = g
        .ct(&CtKeyV4 {
            src_addr: CLIENT,
            dst_addr: NODE,
            src_port_be: 40_500u16.to_be(),
            dst_port_be: 30200u16.to_be(),
            proto: IPPROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        })
        .unwrap();
    assert_eq!(fwd.flags, lb_common::CT_F_SNAT);
    assert_eq!(
        (fwd.snat_addr, u16::from_be(fwd.snat_port_be)),
        (NODE, port)
    );
}

#[test]
fn snat_port_exhaustion_drops_and_counts_then_udp_is_forwarded_on_a_free_port() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let (verdicts, udp) = in_fib_netns(|ifindex, _| {
        // Four ports in the range: four flows get one, the others are dropped
        // (the 16 tries from the flow hash cover all four ports).
        let verdicts: Vec<u32> = (0..6u16)
            .map(|i| {
                g.xdp_on(
                    &tcp((CLIENT, 41_000 + i), (NODE, 30200), true, b""),
                    ifindex,
                )
                .0
            })
            .collect();
        // UDP uses its own mappings (the protocol is part of the key).
        let udp = g.xdp_on(&udp((CLIENT, 5000), (NODE, 30200), b"q"), ifindex);
        (verdicts, udp)
    });
    assert_eq!(
        verdicts.iter().filter(|&&v| v == XDP_TX).count(),
        4,
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.iter().filter(|&&v| v == XDP_DROP).count(),
        2,
        "{verdicts:?}"
    );
    assert_eq!(g.stats().snat_exhausted - s0.snat_exhausted, 2);
    assert_eq!(udp.0, XDP_TX, "UDP to the same backend still finds a port");
    let out = etherparse::SlicedPacket::from_ethernet(&udp.1).unwrap();
    let Some(etherparse::TransportSlice::Udp(u)) = out.transport else {
        panic!("not UDP")
    };
    let Some(etherparse::NetSlice::Ipv4(ip)) = out.net else {
        panic!("not IPv4")
    };
    assert_eq!(
        u.checksum(),
        u.to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
            .unwrap(),
        "UDP checksum after DNAT+SNAT"
    );
}

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

fn fwd_key(sport: u16, dport: u16) -> CtKeyV4 {
    CtKeyV4 {
        src_addr: CLIENT,
        dst_addr: NODE,
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

/// The backend a DNAT'd packet was sent to.
fn dnat_target(out: &[u8]) -> [u8; 4] {
    out[30..34].try_into().unwrap()
}

#[test]
fn round_robin_takes_the_backends_in_turn() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let mut got = Vec::new();
    for (turn, port) in (42_000..42_007u16).enumerate() {
        let (verdict, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30300), true, b""));
        assert_eq!(verdict, XDP_PASS);
        let be = dnat_target(&out);
        got.push(be[3]);
        let ct = g.ct(&fwd_key(port, 30300)).expect("pinned");
        assert_eq!(ct.reason, REASON_ROUND_ROBIN);
        assert_eq!(ct.choice, turn as u32, "the turn is recorded");
        // The host reference agrees turn by turn.
        let key = FrontendKeyV4 {
            addr: NODE,
            port_be: 30300u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let (_, want) = g
            .memory
            .resolve_policy(&key, 0, turn as u64, |_| 0)
            .unwrap();
        assert_eq!(want.addr, be);
    }
    // List order is ascending address, whatever the slice's order.
    assert_eq!(got, [11, 12, 13, 11, 12, 13, 11]);
    // Each flow is counted once on its backend.
    assert_eq!(g.open_of([198, 18, 3, 11]), 3);
    assert_eq!(g.open_of([198, 18, 3, 12]), 2);
    assert_eq!(g.open_of([198, 18, 3, 13]), 2);
    assert_eq!(g.stats().flows_opened, 7);
}

#[test]
fn least_connection_takes_the_backend_with_the_fewest_open_flows() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let a = [198, 18, 4, 11];
    let b = [198, 18, 4, 12];
    let c = [198, 18, 4, 13];
    // The counter map says: a 5, b 2, c 7.
    g.set_open(a, 5);
    g.set_open(b, 2);
    g.set_open(c, 7);
    let (_, out) = g.xdp(&tcp((CLIENT, 43_000), (NODE, 30301), true, b""));
    assert_eq!(dnat_target(&out), b);
    let ct = g.ct(&fwd_key(43_000, 30301)).unwrap();
    assert_eq!(ct.reason, REASON_LEAST_CONN);
    assert_eq!(ct.choice, 2, "the count seen when choosing");
    assert_eq!(g.open_of(b), 3, "counted from the moment it is pinned");

    // All equal: the tie goes to Maglev's pick, as the host reference says.
    for x in [a, b, c] {
        g.set_open(x, 4);
    }
    let key = FrontendKeyV4 {
        addr: NODE,
        port_be: 30301u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    for port in 43_001..43_011u16 {
        for x in [a, b, c] {
            g.set_open(x, 4);
        }
        let h = flow_hash_v4(CLIENT, NODE, port.to_be(), 30301u16.to_be(), IPPROTO_TCP);
        let maglev = g.memory.resolve(&key, h).unwrap().addr;
        let (_, want) = g.memory.resolve_policy(&key, h, 0, |_| 4).unwrap();
        assert_eq!(want.addr, maglev);
        let (_, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30301), true, b""));
        assert_eq!(dnat_target(&out), maglev, "tie → Maglev's pick");
        assert_eq!(g.ct(&fwd_key(port, 30301)).unwrap().choice, 4);
    }
}

#[test]
fn a_fin_from_each_side_or_a_rst_counts_a_flow_down_exactly_once() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let open_total = |g: &Golden| -> u64 {
        PODS.iter()
            .map(|p| g.open_of(p.parse::<Ipv4Addr>().unwrap().octets()))
            .sum()
    };

    // FIN from the client, then from the pod.
    g.xdp(&tcp((CLIENT, 44_000), (NODE, 30090), true, b""));
    let be = g.expected_backend(44_000, 30090, IPPROTO_TCP);
    assert_eq!(g.open_of(be.0), 1);
    assert_eq!(g.ct(&fwd_key(44_000, 30090)).unwrap().reason, REASON_MAGLEV);
    g.xdp(&tcp_end((CLIENT, 44_000), (NODE, 30090), false));
    assert_eq!(g.open_of(be.0), 1, "half-closed is still open");
    let (v, _) = g.tc(&tcp_end(be, (CLIENT, 44_000), false));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(g.open_of(be.0), 0, "FIN both ways: counted down");
    // Retransmitted FINs and the last ACK change nothing.
    g.xdp(&tcp_end((CLIENT, 44_000), (NODE, 30090), false));
    g.tc(&tcp_end(be, (CLIENT, 44_000), false));
    g.xdp(&tcp((CLIENT, 44_000), (NODE, 30090), false, b""));
    assert_eq!(g.open_of(be.0), 0);

    // FIN from the pod first, then from the client.
    g.xdp(&tcp((CLIENT, 44_001), (NODE, 30090), true, b""));
    let be1 = g.expected_backend(44_001, 30090, IPPROTO_TCP);
    assert_eq!(open_total(&g), 1);
    g.tc(&tcp_end(be1, (CLIENT, 44_001), false));
    assert_eq!(open_total(&g), 1);
    g.xdp(&tcp_end((CLIENT, 44_001), (NODE, 30090), false));
    assert_eq!(open_total(&g), 0);

    // RST from the pod, then a RST from the client too: once.
    g.xdp(&tcp((CLIENT, 44_002), (NODE, 30090), true, b""));
    let be2 = g.expected_backend(44_002, 30090, IPPROTO_TCP);
    assert_eq!(open_total(&g), 1);
    g.tc(&tcp_end(be2, (CLIENT, 44_002), true));
    assert_eq!(open_total(&g), 0);
    g.xdp(&tcp_end((CLIENT, 44_002), (NODE, 30090), true));
    assert_eq!(open_total(&g), 0);

    // RST from the client.
    g.xdp(&tcp((CLIENT, 44_003), (NODE, 30090), true, b""));
    assert_eq!(open_total(&g), 1);
    g.xdp(&tcp_end((CLIENT, 44_003), (NODE, 30090), true));
    assert_eq!(open_total(&g), 0);

    // The agent's collector ends a flow (idle timeout) through lb_flow_end:
    // once, and never after the datapath did.
    g.xdp(&tcp((CLIENT, 44_004), (NODE, 30090), true, b""));
    assert_eq!(open_total(&g), 1);
    assert!(close_with(&mut g.dp.ebpf, &fwd_key(44_004, 30090)).unwrap());
    assert_eq!(open_total(&g), 0);
    assert!(!close_with(&mut g.dp.ebpf, &fwd_key(44_004, 30090)).unwrap());
    assert!(!close_with(&mut g.dp.ebpf, &fwd_key(44_000, 30090)).unwrap());
    assert_eq!(open_total(&g), 0);

    let s = g.stats();
    assert_eq!(s.flows_opened, 5);
    assert_eq!(
        s.flows_closed, 4,
        "four closed by the datapath, one by the agent"
    );
    assert_eq!(s.flows_untracked, 0);
}

#[test]
fn a_rebalanced_flow_moves_its_count() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    g.xdp(&tcp((CLIENT, 45_000), (NODE, 30090), true, b""));
    let be = g.expected_backend(45_000, 30090, IPPROTO_TCP);
    let old_id = g.backend_id(be.0);
    assert_eq!(g.open_of(be.0), 1);
    let gone = Ipv4Addr::from(be.0).to_string();
    let rest: Vec<&str> = PODS.iter().copied().filter(|p| *p != gone).collect();
    g.set_endpoints(&rest);
    let (_, out) = g.xdp(&tcp((CLIENT, 45_000), (NODE, 30090), false, b"x"));
    let now = dnat_target(&out);
    assert_ne!(now, be.0);
    assert_eq!(
        g.open_flows().get(&old_id, 0).unwrap(),
        0,
        "moved off the removed backend"
    );
    assert_eq!(g.open_of(now), 1);
    assert_eq!(
        g.ct(&fwd_key(45_000, 30090)).unwrap().reason,
        REASON_REBALANCED
    );
}
