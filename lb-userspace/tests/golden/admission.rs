//! Who is admitted and where to: `loadBalancerSourceRanges`, ClientIP
//! session affinity, `externalTrafficPolicy: Local` without a local
//! endpoint.

use super::*;

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
    let key = |port: u16| {
        flow::key(
            (CLIENT, port.to_be()),
            (lb, 80u16.to_be()),
            IPPROTO_TCP,
            CT_DIR_FORWARD,
        )
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
