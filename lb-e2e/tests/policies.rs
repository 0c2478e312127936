//! Balancing policies in a network-namespace lab: round-robin
//! takes the pods in turn; least-connection keeps long sessions off busy
//! pods; `lb-agent flows` and `lb-agent backends` show what the datapath
//! holds. Needs root and BPF; run with `--test-threads=1` (`cargo xtask
//! test` does).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use lb_testkit::lab::{
    self, Lab,
    agent::{self, SYNCED},
    client,
    manifest::{self, Condition, EchoOptions},
    netns,
};

/// The port the session servers listen on in each pod.
const SESSION_PORT: u16 = 9090;
/// The bound on a least-connection session's queueing delay.
const MAX_DELAY: Duration = Duration::from_millis(200);

fn lab_or_skip(test: &str, pods: u8) -> Option<Lab> {
    if !lb_testkit::guard::can_run_as_root(test) {
        return None;
    }
    Some(Lab::new(pods).unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}")))
}

/// `demo/echo` with the balancing annotation `policy` (none: the
/// default), its TCP port targeting `port` on pods `eps`.
fn service(policy: Option<&'static str>, port: u16, eps: &[(u8, Condition)]) -> String {
    let eps: Vec<_> = eps
        .iter()
        .map(|&(i, c)| (lab::pod_addr(i), manifest::NODE_NAME, c))
        .collect();
    manifest::echo_service_conditions(
        &eps,
        &EchoOptions {
            balancing: policy,
            tcp_target_port: Some(port),
            ..EchoOptions::default()
        },
    )
}

/// `lb-agent <args> --bpffs-root <lab's>` and its stdout.
fn lb_agent(lab: &Lab, args: &[&str]) -> String {
    let bin = agent::binary().expect("lb-agent binary");
    let out = Command::new(bin)
        .args(args)
        .arg("--bpffs-root")
        .arg(lab.bpffs_root())
        .output()
        .expect("run lb-agent");
    assert!(
        out.status.success(),
        "lb-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn flows(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lb_agent(lab, &["flows", "--service", "demo/echo", "--json"]);
    serde_json::from_str(&out).expect("flows --json")
}

fn backends(lab: &Lab) -> Vec<serde_json::Value> {
    serde_json::from_str(&lb_agent(lab, &["backends", "--json"])).expect("backends --json")
}

/// A pod server that serves one connection at a time: reads `HOLD <secs>`,
/// answers `START <label>`, holds the connection that long, answers `END`
/// and closes. Other clients wait in the listen backlog.
struct SessionServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SessionServer {
    fn start(ns: &netns::Netns, label: String) -> Self {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, SESSION_PORT));
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .unwrap()
            .expect("bind the session port");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((conn, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = serve_session(conn, &label);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SessionServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_session(conn: TcpStream, label: &str) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = conn.try_clone()?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let secs: u64 = line
        .trim()
        .strip_prefix("HOLD ")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    writeln!(w, "START {label}")?;
    thread::sleep(Duration::from_secs(secs.min(10)));
    writeln!(w, "END")?;
    w.shutdown(std::net::Shutdown::Both)
}

/// One client session's story.
#[derive(Clone, Debug)]
struct Session {
    /// The client's source port.
    port: u16,
    /// The pod that served it.
    pod: String,
    /// Connect → START.
    delay: Duration,
}

/// Opens a session asking for `secs` seconds; returns the stream (after
/// START) and what is known so far.
fn open_session(secs: u64) -> (BufReader<TcpStream>, Session) {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&lab::frontend(), Duration::from_secs(5)).expect("connect");
    let connected = Instant::now();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let port = s.local_addr().unwrap().port();
    let mut w = s.try_clone().unwrap();
    writeln!(w, "HOLD {secs}").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("START");
    let pod = line
        .trim()
        .strip_prefix("START ")
        .unwrap_or_else(|| {
            panic!(
                "unexpected answer {line:?} (connect took {:?})",
                connected - t0
            )
        })
        .to_owned();
    let delay = connected.elapsed();
    (r, Session { port, pod, delay })
}

/// Waits for END and EOF, then closes.
fn finish_session(mut r: BufReader<TcpStream>) {
    let mut rest = String::new();
    while r.read_line(&mut rest).unwrap_or(0) > 0 {}
    assert!(rest.contains("END"), "session ended early: {rest:?}");
}

/// Session lengths (1-8 s) of each of four workers, back to back: 16
/// sessions, at most 20 s per worker.
const WORKLOAD: [[u64; 4]; 4] = [[3, 8, 1, 5], [1, 2, 6, 4], [5, 1, 2, 7], [2, 4, 8, 1]];

/// Runs the workload from the client namespace; returns every session.
fn run_workload(lab: &Lab) -> Vec<Session> {
    let client = lab.client().name().to_owned();
    let workers: Vec<_> = WORKLOAD
        .iter()
        .enumerate()
        .map(|(w, lengths)| {
            let client = client.clone();
            let lengths = *lengths;
            thread::spawn(move || {
                // Stagger the workers a little so that their first sessions
                // are not one simultaneous burst.
                thread::sleep(Duration::from_millis(50 * w as u64));
                netns::in_netns(&client, move || {
                    lengths
                        .iter()
                        .map(|&secs| {
                            let (r, s) = open_session(secs);
                            finish_session(r);
                            s
                        })
                        .collect::<Vec<_>>()
                })
                .expect("client worker")
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|h| h.join().expect("worker"))
        .collect()
}

fn delays_ms(sessions: &[Session]) -> Vec<u128> {
    sessions.iter().map(|s| s.delay.as_millis()).collect()
}

/// Polls `f` until it is true (up to `within`).
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn round_robin_alternates_between_two_pods() {
    let Some(mut lab) = lab_or_skip("round_robin_alternates_between_two_pods", 2) else {
        return;
    };
    let eps = [(1, Condition::Ready), (2, Condition::Ready)];
    lab.write_manifest_text(&service(Some("round-robin"), manifest::POD_PORT, &eps))
        .unwrap();
    lab.start_agent().unwrap();
    let addr = lab::frontend();
    let answers: Vec<String> = lab
        .in_client(move || {
            (0..20)
                .map(|_| client::http_get(addr).expect("HTTP GET").trim().to_owned())
                .collect()
        })
        .unwrap();
    let count = |p: &str| answers.iter().filter(|a| *a == p).count();
    assert_eq!((count("pod-1"), count("pod-2")), (10, 10), "{answers:?}");
    assert!(
        answers.windows(2).all(|w| w[0] != w[1]),
        "not alternating: {answers:?}"
    );
    // Every flow was counted and has ended: no open flow left.
    assert!(
        eventually(Duration::from_secs(5), || flows(&lab).is_empty()),
        "open flows left: {:?}",
        flows(&lab)
    );
}

#[test]
fn least_connection_keeps_long_sessions_off_busy_pods() {
    let Some(mut lab) = lab_or_skip("least_connection_keeps_long_sessions_off_busy_pods", 5) else {
        return;
    };
    let _servers: Vec<SessionServer> = lab
        .pods()
        .iter()
        .map(|(i, p)| SessionServer::start(p.ns(), lab::pod_label(*i)))
        .collect();
    let all: Vec<(u8, Condition)> = (1..=5).map(|i| (i, Condition::Ready)).collect();
    lab.write_manifest_text(&service(Some("least-connection"), SESSION_PORT, &all))
        .unwrap();
    lab.start_agent().unwrap();

    // 1. The workload under least-connection.
    let lc = run_workload(&lab);
    assert!(lc.len() >= 12);

    // 2. `lb-agent flows` lists exactly the open sessions, then none.
    let client = lab.client().name().to_owned();
    let open: Vec<(BufReader<TcpStream>, Session)> = netns::in_netns(&client, || {
        (0..3).map(|_| open_session(3)).collect::<Vec<_>>()
    })
    .unwrap();
    let want: BTreeSet<(u16, String)> = open
        .iter()
        .map(|(_, s)| {
            let i: u8 = s.pod.trim_start_matches("pod-").parse().unwrap();
            (s.port, format!("{}:{SESSION_PORT}", lab::pod_addr(i)))
        })
        .collect();
    let listed = flows(&lab);
    let got: BTreeSet<(u16, String)> = listed
        .iter()
        .map(|f| {
            let client = f["client"].as_str().unwrap();
            let port = client.rsplit(':').next().unwrap().parse().unwrap();
            (port, f["backend"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(got, want, "lb-agent flows: {listed:?}");
    assert!(listed.iter().all(|f| f["reason"] == "least-connection"));
    println!("{}", lb_agent(&lab, &["flows"]));
    for (r, _) in open {
        finish_session(r);
    }
    assert!(
        eventually(Duration::from_secs(5), || flows(&lab).is_empty()),
        "open flows left: {:?}",
        flows(&lab)
    );

    // 3. A pod marked terminating while it holds a session: its count
    //    falls to zero as the session ends, and it gets no new session.
    let open: Vec<(BufReader<TcpStream>, Session)> = netns::in_netns(&client, || {
        (0..5).map(|_| open_session(5)).collect::<Vec<_>>()
    })
    .unwrap();
    let pods: BTreeSet<&str> = open.iter().map(|(_, s)| s.pod.as_str()).collect();
    assert_eq!(pods.len(), 5, "one session per pod: {pods:?}");
    let mut eps = all.clone();
    eps[4].1 = Condition::Terminating;
    lab.write_manifest_text(&service(Some("least-connection"), SESSION_PORT, &eps))
        .unwrap();
    lab.agent().unwrap().reload(SYNCED).unwrap();
    let pod5 = format!("{}:{SESSION_PORT}", lab::pod_addr(5));
    let row = |lab: &Lab| {
        backends(lab)
            .into_iter()
            .find(|b| b["backend"] == pod5.as_str())
            .expect("pod 5 listed")
    };
    let r5 = row(&lab);
    assert_eq!(r5["state"], "terminating");
    assert_eq!(r5["open_flows"], 1);
    println!("{}", lb_agent(&lab, &["backends"]));
    // A new session goes elsewhere (it queues behind a busy pod: fine).
    let newcomer = thread::spawn({
        let client = client.clone();
        move || netns::in_netns(&client, || open_session(1)).unwrap()
    });
    thread::sleep(Duration::from_millis(300));
    let pinned: Vec<String> = flows(&lab)
        .iter()
        .map(|f| f["backend"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pinned.len(), 6, "{pinned:?}");
    assert_eq!(pinned.iter().filter(|b| **b == pod5).count(), 1);
    for (r, _) in open {
        finish_session(r);
    }
    assert!(
        eventually(Duration::from_secs(5), || row(&lab)["open_flows"] == 0),
        "pod 5 still counts {:?}",
        row(&lab)
    );
    let (r, s) = newcomer.join().unwrap();
    assert_ne!(s.pod, "pod-5");
    finish_session(r);

    // 4. The same workload with the default policy (Maglev), for comparison.
    lab.write_manifest_text(&service(None, SESSION_PORT, &all))
        .unwrap();
    lab.agent().unwrap().reload(SYNCED).unwrap();
    let maglev = run_workload(&lab);

    let per_pod = |s: &[Session]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for x in s {
            *m.entry(x.pod.clone()).or_default() += 1;
        }
        m
    };
    println!(
        "queueing delay (ms), least-connection: {:?}\n                     maglev:           {:?}",
        delays_ms(&lc),
        delays_ms(&maglev)
    );
    println!(
        "sessions per pod, least-connection: {:?}; maglev: {:?}",
        per_pod(&lc),
        per_pod(&maglev)
    );
    let worst = lc.iter().map(|s| s.delay).max().unwrap();
    assert!(
        worst <= MAX_DELAY,
        "a least-connection session waited {worst:?}: {:?}",
        delays_ms(&lc)
    );
}
