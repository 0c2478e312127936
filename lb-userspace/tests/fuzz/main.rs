//! Differential fuzzing of the datapath: random agent states (services,
//! policies, local and remote backends, affinity, source ranges) and random
//! or damaged packets go through the real XDP and TC programs
//! (BPF_PROG_TEST_RUN) and through the reference model (`model.rs`) on cases from `cases.rs`; the
//! verdict and the bytes of every packet, and the flow maps and counters
//! after every state, must match.
//!
//! `LB_FUZZ_SEED` (default 1) and `LB_FUZZ_CASES` (default 100,000) choose
//! the stream; `cargo xtask fuzz --seed S --cases N` runs it alone. A run is
//! deterministic for a seed: a mismatch prints the seed and the case number
//! that reproduce it. Each run of states uses freshly loaded programs and
//! maps, inside a network namespace with no route (so the FIB lookup of a
//! forwarded packet always hands it to the kernel, as the model says).
//!
//! Needs root and a BPF-capable kernel.

mod cases;
mod model;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    TestRun,
    programs::{SchedClassifier, TestRunOptions, Xdp},
};
use lb_common::{MAX_BACKENDS, MAX_SERVICES, Stats, pin};
use lb_testkit::topology::Site;
use lb_userspace::{
    loader::{Datapath, LoadOptions, TC_PROGRAM, XDP_PROGRAM, program},
    model::Desired,
    pinned,
    plan::{PlanConfig, plan},
    writer::{MapWriter, kernel::KernelMaps, memory::MemoryMaps},
};
use rand::{SeedableRng, rngs::Xoshiro256PlusPlus};

use cases::Prog;
use model::{Flows, Model};

/// States per run of loaded programs, and packets per state.
const STATES_PER_RUN: usize = 8;
const PACKETS_PER_STATE: usize = 250;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// Root, or a loud failure under CI / a loud skip elsewhere.
fn privileged() -> bool {
    lb_testkit::guard::can_run_as_root("the datapath fuzzer")
}

/// The loaded programs and their pinned maps for one run.
struct Kernel {
    dp: Datapath,
    maps: KernelMaps,
    /// The pin directory, removed on drop.
    site: Site,
}

impl Kernel {
    fn load(run: u64) -> Self {
        let site = Site::new(&format!("f{run}-")).expect("a site for the pins");
        let mut dp = Datapath::load(&LoadOptions {
            bpffs_root: site.pins().to_owned(),
            ct_capacity: 16_384,
        })
        .expect("load datapath");
        dp.load_ingress(lb_userspace::loader::IngressHook::Xdp)
            .expect("load the XDP program");
        let maps = KernelMaps::from_ebpf(&mut dp.ebpf).expect("maps");
        dp.configure(&cases::CONFIG).expect("configure SNAT");
        Self { dp, maps, site }
    }

    fn run(&mut self, prog: Prog, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let r = match prog {
            Prog::Xdp => program::<Xdp>(&mut self.dp.ebpf, XDP_PROGRAM)
                .unwrap()
                .test_run(opts),
            Prog::Tc => program::<SchedClassifier>(&mut self.dp.ebpf, TC_PROGRAM)
                .unwrap()
                .test_run(opts),
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog:?} {}: {e}", hex(pkt)));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Where the maps are pinned.
    fn pins(&self) -> PathBuf {
        lb_userspace::loader::pin_dir(self.site.pins())
    }

    /// The kernel's flow maps and counters, for the ids `ids` names.
    fn flows(&self, services: &BTreeSet<u32>, backends: &BTreeSet<u32>) -> Flows {
        let dir = self.pins();
        fn hash<K: aya::Pod + Ord, V: aya::Pod>(dir: &Path, name: &str) -> BTreeMap<K, V> {
            pinned::hash::<K, V>(dir, name)
                .unwrap()
                .iter()
                .map(|r| r.unwrap())
                .collect()
        }
        let per_cpu = |name: &str, ids: &BTreeSet<u32>| {
            let m = pinned::per_cpu_array::<lb_common::Counters>(&dir, name).unwrap();
            ids.iter()
                .map(|&id| {
                    let mut c = lb_common::Counters::default();
                    for v in m.get(&id, 0).unwrap().iter() {
                        c.add(v);
                    }
                    (id, c)
                })
                .collect()
        };
        fn array<V: aya::Pod>(dir: &Path, name: &str, ids: &BTreeSet<u32>) -> BTreeMap<u32, V> {
            let m = pinned::array::<V>(dir, name).unwrap();
            ids.iter().map(|&id| (id, m.get(&id, 0).unwrap())).collect()
        }
        let mut st = Stats::default();
        let stats = pinned::per_cpu_array::<Stats>(&dir, pin::STATS).unwrap();
        for v in stats.get(&0, 0).unwrap().iter() {
            st.add(v);
        }
        Flows {
            ct: hash(&dir, pin::CONNTRACK_V4),
            nat: hash(&dir, pin::NAT_V4),
            affinity: hash(&dir, pin::AFFINITY_V4),
            open: hash(&dir, pin::OPEN_FLOWS_V4),
            seq: pinned::array::<u64>(&dir, pin::FLOW_SEQ)
                .unwrap()
                .get(&0, 0)
                .unwrap(),
            be_open: array(&dir, pin::BACKEND_OPEN_FLOWS, backends),
            rr: array(&dir, pin::ROUND_ROBIN, services),
            svc: per_cpu(pin::SERVICE_COUNTERS, services),
            be: array(&dir, pin::BACKEND_COUNTERS, backends),
            stats: st,
        }
    }
}

/// Every id either side may have written.
fn ids(maps: &MemoryMaps, f: &Flows) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut svc: BTreeSet<u32> = maps.frontends.values().map(|v| v.service_id).collect();
    svc.extend(f.rr.keys().chain(f.svc.keys()));
    let mut be: BTreeSet<u32> = maps.backends.keys().copied().collect();
    be.extend(f.be_open.keys().chain(f.be.keys()));
    be.extend(f.ct.values().map(|v| v.backend_id));
    (
        svc.into_iter().filter(|&i| i < MAX_SERVICES).collect(),
        be.into_iter().filter(|&i| i < MAX_BACKENDS).collect(),
    )
}

/// Describes where two flow tables differ.
fn diff<K: std::fmt::Debug + Ord, V: std::fmt::Debug + PartialEq>(
    what: &str,
    want: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
) -> Vec<String> {
    let keys: BTreeSet<&K> = want.keys().chain(got.keys()).collect();
    keys.into_iter()
        .filter(|k| want.get(k) != got.get(k))
        .take(5)
        .map(|k| {
            format!(
                "{what} {k:?}:\n  model:  {:?}\n  kernel: {:?}",
                want.get(k),
                got.get(k)
            )
        })
        .collect()
}

fn compare(want: &Flows, got: &Flows) -> Vec<String> {
    let (w, g) = (want.timeless(), got.timeless());
    let mut out = Vec::new();
    out.extend(diff("conntrack", &w.ct, &g.ct));
    out.extend(diff("nat", &w.nat, &g.nat));
    out.extend(diff("affinity", &w.affinity, &g.affinity));
    out.extend(diff("open flow", &w.open, &g.open));
    out.extend(diff("open count", &w.be_open, &g.be_open));
    if w.seq != g.seq {
        out.push(format!(
            "flow token sequence: model {}, kernel {}",
            w.seq, g.seq
        ));
    }
    out.extend(diff("round-robin turn", &w.rr, &g.rr));
    out.extend(diff("service counters", &w.svc, &g.svc));
    out.extend(diff("backend counters", &w.be, &g.be));
    let (ws, gs) = (w.stats.named(), g.stats.named());
    for ((name, a), (_, b)) in ws.iter().zip(gs.iter()) {
        if a != b {
            out.push(format!("stats.{name}: model {a}, kernel {b}"));
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `cases` packets from `seed`; panics with a reproducer on the first
/// difference. Returns the number of states and runs, and the verdict
/// counters summed over runs (what the cases exercised).
fn fuzz(seed: u64, cases: u64) -> (u64, u64, Stats) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let cfg = PlanConfig::new(251).unwrap();
    let (mut done, mut states, mut runs) = (0u64, 0u64, 0u64);
    let mut seen = Stats::default();
    while done < cases {
        let mut k = Kernel::load(runs);
        let mut memory = MemoryMaps::default();
        let mut flows = Flows::default();
        let mut desired = Desired::default();
        for _ in 0..STATES_PER_RUN {
            if done >= cases {
                break;
            }
            desired = cases::desired(&mut rng, &desired);
            let ops = plan(&memory.read_state().unwrap(), &desired, &cfg).expect("plan");
            k.maps.apply(&ops).expect("apply to the kernel maps");
            memory.apply(&ops).expect("apply to the memory maps");
            states += 1;
            for _ in 0..PACKETS_PER_STATE {
                if done >= cases {
                    break;
                }
                let (prog, pkt) = cases::packet(&mut rng, &memory, &flows);
                done += 1;
                let mut m = Model {
                    maps: &memory,
                    cfg: cases::CONFIG,
                    flows: &mut flows,
                };
                let want = match prog {
                    Prog::Xdp => m.xdp(&pkt),
                    Prog::Tc => m.tc(&pkt),
                };
                let got = k.run(prog, &pkt);
                assert!(
                    want == got,
                    "case {done} (reproduce: LB_FUZZ_SEED={seed} LB_FUZZ_CASES={done}): \
                     {prog:?} of {}\n  model:  verdict {} {}\n  kernel: verdict {} {}",
                    hex(&pkt),
                    want.0,
                    hex(&want.1),
                    got.0,
                    hex(&got.1),
                );
            }
            let (svc, be) = ids(&memory, &flows);
            let diffs = compare(&flows, &k.flows(&svc, &be));
            assert!(
                diffs.is_empty(),
                "maps differ after case {done} (reproduce: LB_FUZZ_SEED={seed} \
                 LB_FUZZ_CASES={done}):\n{}",
                diffs.join("\n")
            );
        }
        seen.add(&flows.stats);
        runs += 1;
    }
    (states, runs, seen)
}

#[test]
fn the_datapath_matches_the_reference_model_on_random_states_and_packets() {
    if !privileged() {
        return;
    }
    let seed = env_u64("LB_FUZZ_SEED", 1);
    let cases = env_u64("LB_FUZZ_CASES", 100_000);
    let started = Instant::now();
    // A network namespace of our own with no route: FIB lookups fail the
    // same way every time.
    let (states, runs, seen) = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            fuzz(seed, cases)
        })
        .join()
        .expect("fuzzer thread")
    });
    println!(
        "datapath fuzz: seed {seed}, {cases} cases, {states} states, {runs} program loads, \
         0 mismatches, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let exercised: Vec<String> = seen
        .named()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("verdicts exercised: {}", exercised.join(", "));
}
