//! Churn under traffic: two rolling updates of a six-pod Deployment (surge
//! 1, unavailable 0) with the agent killed and restarted in the middle of
//! the first, while long-lived TCP connections, idle-then-talking UDP flows
//! and a stream of short TCP connections go through the NodePort.
//!
//! Every step is what the EndpointSlice controller shows: a new pod becomes
//! ready, then an old one turns terminating (`ready: false, serving: true,
//! terminating: true`), then it leaves the slice. The second update brings
//! the first pods back at their old addresses, so addresses and backend ids
//! are reused. A removed pod keeps running for one more step (as a pod in
//! its grace period does), so that a packet wrongly sent to it would be
//! answered, and seen.
//!
//! Needs root and BPF (`cargo test -p lb-e2e --test churn --
//! --test-threads=1`; `cargo xtask test` runs it with `LB_AGENT_BIN` set to
//! a fresh build). Without root it prints SKIPPED and passes, except under
//! CI, where it fails.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use lb_testkit::lab::{
    self, Lab,
    client::{self, EchoConn},
    manifest::Condition,
};

/// Pods of the Deployment.
const REPLICAS: u8 = 6;
/// Long-lived TCP connections (each replaced by a new one when its pod goes).
const LONG_LIVED: usize = 6;
/// Interval between two requests on a long-lived connection.
const TALK_EVERY: Duration = Duration::from_millis(100);
/// UDP flows (unconnected sockets, one client port each).
const UDP_FLOWS: usize = 16;
/// How long the UDP flows stay silent between two rounds: longer than a
/// rolling-update step, so that a flow's pod may change state meanwhile.
const UDP_IDLE: Duration = Duration::from_secs(3);
/// How long a UDP flow waits for an answer before sending again (once).
const UDP_WAIT: Duration = Duration::from_secs(1);
/// Pause between two short connections.
const SHORT_EVERY: Duration = Duration::from_millis(15);
/// Time between two manifest changes of a rolling-update step.
const DWELL: Duration = Duration::from_millis(1_200);

// ---------------------------------------------------------------- the pods --

/// When a pod instance changed state: the agent is told at the first
/// instant and has synced by the second; the datapath changed in between.
#[derive(Debug, Default, Clone, Copy)]
struct Life {
    terminating: Change,
    removed: Change,
}

/// One change of a pod: when the agent was told, when it had synced.
#[derive(Debug, Default, Clone, Copy)]
struct Change {
    told: Option<Instant>,
    synced: Option<Instant>,
}

impl Change {
    fn synced_before(&self, at: Instant) -> bool {
        self.synced.is_some_and(|t| t < at)
    }

    fn told_by(&self, at: Instant) -> bool {
        self.told.is_some_and(|t| t <= at)
    }
}

/// Which change of a pod.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Terminating,
    Removed,
}

/// Every pod instance the test created, by the label its server answers
/// with (a pod recreated at an old address answers with a new label).
#[derive(Debug, Default)]
struct Registry(Mutex<BTreeMap<String, Life>>);

impl Registry {
    fn create(&self, label: &str) {
        self.0
            .lock()
            .unwrap()
            .insert(label.to_owned(), Life::default());
    }

    fn life(&self, label: &str) -> Option<Life> {
        self.0.lock().unwrap().get(label).copied()
    }

    fn change(&self, label: &str, phase: Phase) -> Change {
        let life = self.life(label).unwrap_or_default();
        match phase {
            Phase::Terminating => life.terminating,
            Phase::Removed => life.removed,
        }
    }

    fn edit(&self, label: &str, phase: Phase, f: impl FnOnce(&mut Change)) {
        let mut pods = self.0.lock().unwrap();
        let life = pods.get_mut(label).expect("a pod the test created");
        f(match phase {
            Phase::Terminating => &mut life.terminating,
            Phase::Removed => &mut life.removed,
        });
    }

    /// Records that the agent is about to be told (call before the signal).
    fn told(&self, label: &str, phase: Phase) {
        self.edit(label, phase, |c| c.told = Some(Instant::now()));
    }

    /// Records that the agent has synced the change.
    fn synced(&self, label: &str, phase: Phase) {
        self.edit(label, phase, |c| c.synced = Some(Instant::now()));
    }

    /// Why `label` must not answer a new flow started at `at`: unknown, or
    /// already terminating or removed (the agent had synced that) by then.
    fn refuses_new_flow(&self, label: &str, at: Instant) -> Option<&'static str> {
        let Some(life) = self.life(label) else {
            return Some("an unknown pod");
        };
        if life.removed.synced_before(at) {
            return Some("a removed pod");
        }
        if life.terminating.synced_before(at) {
            return Some("a terminating pod");
        }
        None
    }

    /// Why `label` must not answer a packet of a pinned flow sent at `at`:
    /// unknown, or removed (synced) by then.
    fn refuses_packet(&self, label: &str, at: Instant) -> Option<&'static str> {
        match self.life(label) {
            None => Some("an unknown pod"),
            Some(life) if life.removed.synced_before(at) => Some("a removed pod"),
            Some(_) => None,
        }
    }

    /// Whether the removal of `label` had started (the agent was told) by
    /// `at`: from then on its flows may be re-balanced, and its TCP
    /// connections reset.
    fn removal_started(&self, label: &str, at: Instant) -> bool {
        self.change(label, Phase::Removed).told_by(at)
    }
}

/// What the clients saw that must not happen, and what they did.
#[derive(Debug, Default)]
struct Findings {
    /// Answers from the wrong place: another source address, a removed
    /// pod, a terminating pod for a new flow, another pod on a pinned flow.
    misrouted: Vec<String>,
    /// TCP connections reset (or broken) while their pod was still there.
    broken_survivors: Vec<String>,
    /// New short connections that failed.
    short_failures: Vec<String>,
    /// UDP datagrams not answered after two tries.
    udp_unanswered: Vec<String>,
    /// Counters for the report.
    long_exchanges: usize,
    long_reset_after_removal: usize,
    long_connections: usize,
    udp_answers: usize,
    udp_rebalanced: usize,
    short_ok: usize,
    short_slow: usize,
}

impl Findings {
    fn merge(&mut self, other: Self) {
        self.misrouted.extend(other.misrouted);
        self.broken_survivors.extend(other.broken_survivors);
        self.short_failures.extend(other.short_failures);
        self.udp_unanswered.extend(other.udp_unanswered);
        self.long_exchanges += other.long_exchanges;
        self.long_reset_after_removal += other.long_reset_after_removal;
        self.long_connections += other.long_connections;
        self.udp_answers += other.udp_answers;
        self.udp_rebalanced += other.udp_rebalanced;
        self.short_ok += other.short_ok;
        self.short_slow += other.short_slow;
    }
}

// ------------------------------------------------------------- the clients --

/// Shared by the client threads.
#[derive(Clone)]
struct Ctx {
    t0: Instant,
    frontend: SocketAddr,
    pods: Arc<Registry>,
    stop: Arc<AtomicBool>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Seconds since the start, for messages.
    fn at(&self, t: Instant) -> String {
        format!("t={:.2}s", t.duration_since(self.t0).as_secs_f64())
    }
}

/// A long-lived echo connection, one request every [`TALK_EVERY`]: each
/// answer must come from the pod that answered first. When that pod's
/// removal has started the connection may break; it is then replaced by a
/// new one. Any other break, or an answer from another pod, is a finding.
fn long_lived(ctx: &Ctx, who: usize) -> Findings {
    let mut f = Findings::default();
    let mut n = 0u64;
    'connections: while !ctx.stopped() {
        let opened = Instant::now();
        let mut conn = match EchoConn::connect(ctx.frontend) {
            Ok(c) => c,
            Err(e) => {
                f.short_failures.push(format!(
                    "{} long-lived #{who}: connect: {e:#}",
                    ctx.at(opened)
                ));
                thread::sleep(TALK_EVERY);
                continue;
            }
        };
        f.long_connections += 1;
        let mut serving: Option<String> = None;
        while !ctx.stopped() {
            n += 1;
            let sent = Instant::now();
            match conn.ask(&format!("c{who} line {n}")) {
                Ok(pod) => {
                    f.long_exchanges += 1;
                    match &serving {
                        None => {
                            if let Some(why) = ctx.pods.refuses_new_flow(&pod, opened) {
                                f.misrouted.push(format!(
                                    "{} long-lived #{who}: new connection answered by {why} {pod}",
                                    ctx.at(sent)
                                ));
                            }
                            serving = Some(pod);
                        }
                        Some(p) if *p != pod => f.misrouted.push(format!(
                            "{} long-lived #{who}: served by {p}, then answered by {pod}",
                            ctx.at(sent)
                        )),
                        Some(_) => {
                            if let Some(why) = ctx.pods.refuses_packet(&pod, sent) {
                                f.misrouted.push(format!(
                                    "{} long-lived #{who}: answered by {why} {pod}",
                                    ctx.at(sent)
                                ));
                            }
                        }
                    }
                }
                Err(e) => {
                    // Judged when the break is seen: the request may have
                    // left just before the agent was told.
                    let seen = Instant::now();
                    let pod = serving.clone().unwrap_or_else(|| "(no answer yet)".into());
                    if ctx.pods.removal_started(&pod, seen) {
                        f.long_reset_after_removal += 1;
                    } else {
                        f.broken_survivors.push(format!(
                            "{} long-lived #{who} to {pod}, whose pod was not being removed: \
                             {e:#}",
                            ctx.at(sent)
                        ));
                    }
                    continue 'connections;
                }
            }
            thread::sleep(TALK_EVERY.saturating_sub(sent.elapsed()));
        }
    }
    f
}

/// [`UDP_FLOWS`] unconnected sockets, each a flow: all speak, then all stay
/// silent for [`UDP_IDLE`]. Every answer must come from the frontend
/// address; a flow stays with its pod until that pod's removal starts, and
/// is then answered by a pod that takes new flows.
fn udp_flows(ctx: &Ctx) -> Findings {
    let mut f = Findings::default();
    let sockets: Vec<UdpSocket> = (0..UDP_FLOWS)
        .map(|_| {
            let s = UdpSocket::bind(("0.0.0.0", 0)).expect("bind a UDP socket");
            s.set_read_timeout(Some(UDP_WAIT)).expect("set a timeout");
            s
        })
        .collect();
    let mut pinned: Vec<Option<String>> = vec![None; UDP_FLOWS];
    let mut buf = [0u8; 512];
    let mut round = 0;
    while !ctx.stopped() {
        round += 1;
        let sent = Instant::now();
        for s in &sockets {
            let _ = s.send_to(format!("round {round}").as_bytes(), ctx.frontend);
        }
        for (k, s) in sockets.iter().enumerate() {
            let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            let mut answer = None;
            for attempt in 0..2 {
                match s.recv_from(&mut buf) {
                    Ok((len, from)) => {
                        answer = Some((String::from_utf8_lossy(&buf[..len]).into_owned(), from));
                        break;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if attempt == 0 {
                            let _ = s.send_to(format!("round {round}").as_bytes(), ctx.frontend);
                        }
                    }
                    Err(e) => {
                        f.udp_unanswered
                            .push(format!("{} UDP :{port}: {e}", ctx.at(sent)));
                        break;
                    }
                }
            }
            let Some((pod, from)) = answer else {
                f.udp_unanswered.push(format!(
                    "{} UDP :{port} (pinned to {:?}): no answer to 2 datagrams",
                    ctx.at(sent),
                    pinned[k]
                ));
                continue;
            };
            f.udp_answers += 1;
            if from != ctx.frontend {
                f.misrouted.push(format!(
                    "{} UDP :{port}: answer {pod:?} came from {from}, not from {}",
                    ctx.at(sent),
                    ctx.frontend
                ));
            }
            match &pinned[k] {
                Some(p) if *p == pod => {
                    if let Some(why) = ctx.pods.refuses_packet(&pod, sent) {
                        f.misrouted.push(format!(
                            "{} UDP :{port}: answered by {why} {pod}",
                            ctx.at(sent)
                        ));
                    }
                }
                Some(p) if !ctx.pods.removal_started(p, sent) => f.misrouted.push(format!(
                    "{} UDP :{port}: pinned to {p} (still there), answered by {pod}",
                    ctx.at(sent)
                )),
                previous => {
                    if previous.is_some() {
                        f.udp_rebalanced += 1;
                    }
                    if let Some(why) = ctx.pods.refuses_new_flow(&pod, sent) {
                        f.misrouted.push(format!(
                            "{} UDP :{port}: new or re-balanced flow answered by {why} {pod}",
                            ctx.at(sent)
                        ));
                    }
                }
            }
            pinned[k] = Some(pod);
        }
        let until = sent + UDP_IDLE;
        while !ctx.stopped() && Instant::now() < until {
            thread::sleep(Duration::from_millis(50));
        }
    }
    f
}

/// New short TCP connections (one HTTP GET each), back to back: every one
/// must succeed, answered by a pod that takes new flows.
fn short_connections(ctx: &Ctx) -> Findings {
    let mut f = Findings::default();
    while !ctx.stopped() {
        let sent = Instant::now();
        match client::http_get(ctx.frontend) {
            Ok(pod) => {
                f.short_ok += 1;
                // A connect that needed a SYN retransmission (1 s).
                if sent.elapsed() > Duration::from_millis(900) {
                    f.short_slow += 1;
                }
                if let Some(why) = ctx.pods.refuses_new_flow(&pod, sent) {
                    f.misrouted.push(format!(
                        "{} short connection answered by {why} {pod}",
                        ctx.at(sent)
                    ));
                }
            }
            Err(e) => f
                .short_failures
                .push(format!("{} short connection: {e:#}", ctx.at(sent))),
        }
        thread::sleep(SHORT_EVERY);
    }
    f
}

// ---------------------------------------------------------------- the test --

/// The lab, or `None` (after saying why) when the test cannot run here.
fn lab_or_skip(test: &str, pods: u8) -> Option<Lab> {
    lb_testkit::guard::can_run_as_root(test)
        .then(|| Lab::new(pods).unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}")))
}

/// The Deployment as the test drives it: which pod numbers are endpoints,
/// in which condition, and the label each pod answers with.
struct Rollout {
    endpoints: Vec<(u8, Condition)>,
    labels: BTreeMap<u8, String>,
    /// Pods removed from the slice whose namespace still runs (grace period).
    lingering: Vec<u8>,
}

impl Rollout {
    fn label(&self, i: u8) -> &str {
        &self.labels[&i]
    }
}

/// One manifest change: write, SIGHUP, wait for the sync.
fn change(lab: &mut Lab, r: &Rollout) {
    lab.reload_conditions(&r.endpoints)
        .unwrap_or_else(|e| panic!("reload {:?}: {e:#}", r.endpoints));
}

#[test]
fn two_rolling_updates_and_an_agent_restart_under_traffic_misroute_nothing() {
    let test = "two_rolling_updates_and_an_agent_restart_under_traffic_misroute_nothing";
    let Some(mut lab) = lab_or_skip(test, REPLICAS) else {
        return;
    };
    let t0 = Instant::now();
    let pods = Arc::new(Registry::default());
    let mut r = Rollout {
        endpoints: (1..=REPLICAS).map(|i| (i, Condition::Ready)).collect(),
        labels: (1..=REPLICAS).map(|i| (i, lab::pod_label(i))).collect(),
        lingering: Vec::new(),
    };
    for label in r.labels.values() {
        pods.create(label);
    }
    lab.write_manifest_conditions(&r.endpoints).unwrap();
    lab.start_agent().unwrap();

    let ctx = Ctx {
        t0,
        frontend: lab::frontend(),
        pods: pods.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let spawn = |name: String, work: Box<dyn FnOnce() -> Findings + Send>| {
        lab.in_client(move || {
            thread::Builder::new()
                .name(name)
                .spawn(work)
                .expect("spawn a client thread")
        })
        .expect("enter the client namespace")
    };
    let mut workers: Vec<JoinHandle<Findings>> = Vec::new();
    for who in 0..LONG_LIVED {
        let c = ctx.clone();
        workers.push(spawn(
            format!("long-{who}"),
            Box::new(move || long_lived(&c, who)),
        ));
    }
    let c = ctx.clone();
    workers.push(spawn("udp".into(), Box::new(move || udp_flows(&c))));
    let c = ctx.clone();
    workers.push(spawn(
        "short".into(),
        Box::new(move || short_connections(&c)),
    ));
    thread::sleep(Duration::from_secs(2));

    // Two rolling updates: 1-6 -> 7-12 -> 1-6 (new instances, old addresses).
    let say = |what: String| println!("t={:6.2}s {what}", t0.elapsed().as_secs_f64());
    for (update, (old, new)) in [
        (1..=REPLICAS, 7..=2 * REPLICAS),
        (7..=2 * REPLICAS, 1..=REPLICAS),
    ]
    .into_iter()
    .enumerate()
    {
        for (step, (o, n)) in old.zip(new).enumerate() {
            // Surge: the new pod starts and becomes ready.
            let label = if update == 0 {
                lab::pod_label(n)
            } else {
                format!("pod-{n}-v2")
            };
            pods.create(&label);
            lab.add_pod_labelled(n, &label).unwrap();
            r.labels.insert(n, label);
            r.endpoints.push((n, Condition::Ready));
            change(&mut lab, &r);
            say(format!(
                "update {} step {}: {} ready",
                update + 1,
                step + 1,
                r.label(n)
            ));
            thread::sleep(DWELL);

            // The old pod terminates (still serving its flows). In the
            // middle of the first update the agent is SIGKILLed first, and
            // the new agent finds the change in the manifest at start.
            r.endpoints
                .iter_mut()
                .filter(|(i, _)| *i == o)
                .for_each(|(_, c)| *c = Condition::Terminating);
            if update == 0 && step == REPLICAS as usize / 2 {
                lab.kill_agent().unwrap();
                say("agent SIGKILLed".into());
                pods.told(r.label(o), Phase::Terminating);
                lab.write_manifest_conditions(&r.endpoints).unwrap();
                thread::sleep(Duration::from_secs(1));
                lab.start_agent().unwrap();
                say("agent restarted".into());
            } else {
                pods.told(r.label(o), Phase::Terminating);
                change(&mut lab, &r);
            }
            pods.synced(r.label(o), Phase::Terminating);
            say(format!(
                "update {} step {}: {} terminating",
                update + 1,
                step + 1,
                r.label(o)
            ));
            thread::sleep(DWELL);

            // The old pod leaves the slice; its process lingers one step.
            r.endpoints.retain(|(i, _)| *i != o);
            pods.told(r.label(o), Phase::Removed);
            change(&mut lab, &r);
            pods.synced(r.label(o), Phase::Removed);
            say(format!(
                "update {} step {}: {} removed",
                update + 1,
                step + 1,
                r.label(o)
            ));
            for gone in r.lingering.drain(..) {
                lab.remove_pod(gone);
            }
            r.lingering.push(o);
            thread::sleep(DWELL);
        }
    }
    // Let every UDP flow speak once more after the last change.
    thread::sleep(UDP_IDLE + UDP_WAIT);
    ctx.stop.store(true, Ordering::SeqCst);
    let mut f = Findings::default();
    for w in workers {
        f.merge(w.join().expect("a client thread panicked"));
    }
    let took = t0.elapsed();

    let stats = lab.stats().unwrap();
    let flows = lb_testkit::cmd::output(
        std::process::Command::new(lb_agent_bin())
            .args(["flows", "--bpffs-root"])
            .arg(lab.bpffs_root()),
    )
    .unwrap_or_else(|e| format!("(lb-agent flows failed: {e:#})"));
    println!("---- {test}: {:.1} s", took.as_secs_f64());
    println!(
        "long-lived: {} connections, {} exchanges, {} reset after their pod's removal started",
        f.long_connections, f.long_exchanges, f.long_reset_after_removal
    );
    println!(
        "UDP: {} answers over {UDP_FLOWS} flows, {} re-balanced after their pod's removal",
        f.udp_answers, f.udp_rebalanced
    );
    println!(
        "short connections: {} ok ({} needed a SYN retransmission), {} failed",
        f.short_ok,
        f.short_slow,
        f.short_failures.len()
    );
    let interesting = [
        "new_flows",
        "established",
        "rebalanced",
        "ct_insert_failed",
        "reject_tcp",
        "reject_udp",
        "drop_reply_clash",
        "tc_reverse_nat",
        "tc_rewrite_failed",
        "flows_untracked",
    ];
    let shown: Vec<String> = interesting
        .iter()
        .map(|k| format!("{k}={}", stats.get(*k).copied().unwrap_or(0)))
        .collect();
    println!("LB_STATS: {}", shown.join(" "));
    let problems = [
        ("misrouted answers", &f.misrouted),
        ("surviving connections broken", &f.broken_survivors),
        ("short connections failed", &f.short_failures),
        ("UDP datagrams unanswered", &f.udp_unanswered),
    ];
    for (what, list) in problems {
        println!("{what}: {}", list.len());
        for line in list.iter().take(20) {
            println!("    {line}");
        }
    }
    let failed: Vec<String> = problems
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(what, l)| format!("{} {what}", l.len()))
        .collect();
    assert!(
        failed.is_empty(),
        "{test}: {}\nLB_STATS: {stats:?}\nlb-agent flows:\n{flows}\nagent log:\n{}",
        failed.join(", "),
        lab.agent().map(|a| a.log()).unwrap_or_default()
    );
    // The traffic did run, and did see the churn.
    assert!(
        f.long_reset_after_removal >= LONG_LIVED,
        "only {} long-lived connections were reset by their pod's removal (expected every \
         one of the first {LONG_LIVED} at least)",
        f.long_reset_after_removal
    );
    assert!(f.udp_rebalanced > 0, "no UDP flow was re-balanced");
    assert!(f.short_ok > 500, "only {} short connections", f.short_ok);
    assert!(
        stats["rebalanced"] > 0,
        "LB_STATS counted no re-balanced flow: {stats:?}"
    );
    assert!(
        took < Duration::from_secs(180),
        "the test took {took:?}, over its 3 minute budget"
    );
}

/// The agent binary the lab runs.
fn lb_agent_bin() -> std::path::PathBuf {
    lb_testkit::lab::agent::binary().expect("lb-agent binary")
}
