//! The load generator: non-blocking sockets on a few epoll threads inside
//! the client namespace (cheap enough that on 2 cores most of the CPU is
//! left to the path under test).
//!
//! TCP: each request is a new connection (connect, send [`REQUEST`], read
//! the answer until the server's FIN, close). Closed loop: each thread keeps
//! its share of `in_flight` connections open, starting the next as one ends;
//! the rate counts completions after a warm-up. Open loop: each thread
//! starts connections at fixed times (its share of `rate`, evenly spaced)
//! whatever the earlier ones are doing, and latency runs from that scheduled
//! start, so a generator or path that falls behind shows up as latency, not
//! as a lower offered load.
//!
//! UDP: `flows` connected sockets (fixed source ports, so established flows
//! for the load balancer), each with one request outstanding: a datagram
//! that carries a sequence number, echoed by the pod; the answer sends the
//! next. A request unanswered after [`UDP_TIMEOUT`] is counted lost and sent
//! again.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{self, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use super::{
    server::{OK_PREFIX, REQUEST},
    sys::{self, Epoll},
};

/// How long a connection may take, from its start to the server's FIN.
/// Longer than one SYN retransmission (1 s), shorter than two (3 s).
pub const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a UDP request waits for its echo before it is sent again.
pub const UDP_TIMEOUT: Duration = Duration::from_millis(200);
/// The longest wait between two looks at the clock.
const TICK: Duration = Duration::from_millis(10);

/// Closed or open loop.
#[derive(Debug, Clone, Copy)]
pub enum Loop {
    /// Keep this many connections open at all times (all threads together).
    Closed {
        /// Connections in flight.
        in_flight: usize,
    },
    /// Start this many connections per second (all threads together).
    Open {
        /// Connections per second.
        rate: f64,
    },
}

/// One TCP run.
#[derive(Debug, Clone)]
pub struct TcpRun {
    /// Where to connect, round robin.
    pub targets: Vec<SocketAddrV4>,
    /// Closed or open loop.
    pub mode: Loop,
    /// How long to start connections (warm-up included).
    pub duration: Duration,
    /// The first part of `duration` whose completions the rate leaves out.
    pub warmup: Duration,
    /// Generator threads.
    pub threads: usize,
}

/// What a TCP run saw.
#[derive(Debug, Clone, Default)]
pub struct TcpOutcome {
    /// Connections started.
    pub started: u64,
    /// Connections answered (all of them, warm-up included).
    pub answered: u64,
    /// Connections answered after the warm-up and before the end.
    pub answered_in_window: u64,
    /// The window (duration − warm-up).
    pub window: Duration,
    /// Latency of every answered connection, µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Failures by kind (`refused`, `timeout`, `reset`, `bad_response`, …).
    pub failures: BTreeMap<String, u64>,
}

impl TcpOutcome {
    /// Answered connections per second in the window.
    pub fn rate(&self) -> f64 {
        self.answered_in_window as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// All failures.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The `p`-th percentile latency in ms (nearest rank), NaN if none.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_us, p) / 1e3
    }

    fn merge(&mut self, other: Self) {
        self.started += other.started;
        self.answered += other.answered;
        self.answered_in_window += other.answered_in_window;
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
    }
}

/// The `p`-th percentile (nearest rank) of sorted `v`, NaN if empty.
pub fn percentile_us(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    f64::from(v[rank.clamp(1, v.len()) - 1])
}

/// Runs `run` on `run.threads` threads spawned from the calling thread
/// (call it inside the client namespace: the threads inherit it).
pub fn tcp(run: &TcpRun) -> Result<TcpOutcome> {
    let threads = run.threads.max(1);
    let t0 = Instant::now() + Duration::from_millis(5);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let run = run.clone();
            thread::Builder::new()
                .name(format!("tcp-load-{t}"))
                .spawn(move || tcp_thread(&run, t, threads, t0))
        })
        .collect::<io::Result<_>>()?;
    let mut out = TcpOutcome {
        window: run.duration.saturating_sub(run.warmup),
        ..TcpOutcome::default()
    };
    for h in handles {
        let part = h.join().map_err(|_| anyhow!("a load thread panicked"))??;
        out.merge(part);
    }
    out.latencies_us.sort_unstable();
    Ok(out)
}

/// One connection of the generator.
struct Conn {
    stream: TcpStream,
    /// Its (scheduled) start.
    start: Instant,
    /// The request is sent.
    sent: bool,
    /// What the server answered so far.
    answer: Vec<u8>,
    /// Bumped each time the slot is reused, so that stale timeouts are ignored.
    generation: u32,
}

/// Open connections in slots, with a queue of deadlines in start order.
struct Table {
    slots: Vec<Option<Conn>>,
    generations: Vec<u32>,
    free: Vec<usize>,
    deadlines: VecDeque<(Instant, usize, u32)>,
    open: usize,
}

impl Table {
    fn insert(&mut self, stream: TcpStream, start: Instant) -> usize {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.generations.push(0);
            self.slots.len() - 1
        });
        self.generations[slot] = self.generations[slot].wrapping_add(1);
        let generation = self.generations[slot];
        self.slots[slot] = Some(Conn {
            stream,
            start,
            sent: false,
            answer: Vec::new(),
            generation,
        });
        self.deadlines
            .push_back((start + TCP_TIMEOUT, slot, generation));
        self.open += 1;
        slot
    }

    fn remove(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.open -= 1;
        Some(conn)
    }
}

fn failure_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::ETIMEDOUT) => "connect_timeout".into(),
        Some(libc::EHOSTUNREACH) => "host_unreachable".into(),
        Some(libc::ENETUNREACH) => "net_unreachable".into(),
        Some(libc::EADDRNOTAVAIL) => "no_local_port".into(),
        Some(libc::EMFILE | libc::ENFILE) => "out_of_descriptors".into(),
        _ => format!("{:?}", e.kind()),
    }
}

fn tcp_thread(run: &TcpRun, me: usize, threads: usize, t0: Instant) -> Result<TcpOutcome> {
    sys::raise_priority();
    let ep = Epoll::new()?;
    let mut events = sys::event_buffer(256);
    let mut table = Table {
        slots: Vec::new(),
        generations: Vec::new(),
        free: Vec::new(),
        deadlines: VecDeque::new(),
        open: 0,
    };
    let mut out = TcpOutcome::default();
    let end = t0 + run.duration;
    let window_start = t0 + run.warmup;
    let mut next_target = me;
    // Open loop: the k-th start of this thread is at t0 + (k + me/threads) / rate_thread.
    let (in_flight, interval) = match run.mode {
        Loop::Closed { in_flight } => {
            let share = in_flight / threads + usize::from(me < in_flight % threads);
            (share, None)
        }
        Loop::Open { rate } => (
            usize::MAX,
            Some(Duration::from_secs_f64(threads as f64 / rate.max(1e-3))),
        ),
    };
    let mut next_start = match interval {
        Some(iv) => t0 + iv.mul_f64(me as f64 / threads as f64),
        None => t0,
    };
    while Instant::now() < t0 {
        thread::sleep(Duration::from_micros(200));
    }
    loop {
        let now = Instant::now();
        if lb_testkit::lab::interrupted() {
            break;
        }
        // Start what is due.
        match interval {
            None => {
                if now < end {
                    // One try per free place: a connect that fails at once
                    // does not spin here.
                    for _ in table.open..in_flight {
                        start(
                            run,
                            &mut next_target,
                            threads,
                            now,
                            &ep,
                            &mut table,
                            &mut out,
                        )?;
                    }
                }
            }
            Some(iv) => {
                while next_start <= now && next_start < end {
                    let at = next_start;
                    next_start += iv;
                    start(
                        run,
                        &mut next_target,
                        threads,
                        at,
                        &ep,
                        &mut table,
                        &mut out,
                    )?;
                }
            }
        }
        // Time out the oldest.
        while let Some(&(deadline, slot, generation)) = table.deadlines.front() {
            if deadline > now {
                break;
            }
            table.deadlines.pop_front();
            let stale = table.slots[slot]
                .as_ref()
                .is_none_or(|c| c.generation != generation);
            if !stale {
                table.remove(slot);
                *out.failures.entry("timeout".into()).or_default() += 1;
            }
        }
        if now >= end && table.open == 0 {
            break;
        }
        let mut wait = TICK;
        if interval.is_some() && next_start < end {
            wait = wait.min(next_start.saturating_duration_since(now));
        }
        let n = ep.wait(&mut events, Some(wait))?;
        let now = Instant::now();
        for ev in &events[..n] {
            let slot = sys::token(ev) as usize;
            let flags = sys::events(ev);
            let Some(conn) = table.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            match progress(conn, flags) {
                Progress::Wait => {}
                Progress::Answered => {
                    let conn = table.remove(slot).expect("slot is open");
                    out.answered += 1;
                    if now >= window_start && now < end {
                        out.answered_in_window += 1;
                    }
                    let us = now.saturating_duration_since(conn.start).as_micros();
                    out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                Progress::Failed(kind) => {
                    table.remove(slot);
                    *out.failures.entry(kind).or_default() += 1;
                }
            }
        }
    }
    Ok(out)
}

fn start(
    run: &TcpRun,
    next_target: &mut usize,
    threads: usize,
    at: Instant,
    ep: &Epoll,
    table: &mut Table,
    out: &mut TcpOutcome,
) -> Result<()> {
    let target = run.targets[*next_target % run.targets.len()];
    *next_target = next_target.wrapping_add(threads);
    out.started += 1;
    match sys::connect_nonblocking(target) {
        Ok(stream) => {
            let fd = stream.as_raw_fd();
            let slot = table.insert(stream, at);
            ep.add(fd, sys::IN | sys::OUT | sys::ET, slot as u64)?;
        }
        Err(e) => *out.failures.entry(failure_kind(&e)).or_default() += 1,
    }
    Ok(())
}

enum Progress {
    Wait,
    Answered,
    Failed(String),
}

/// Advances a connection on an event (edge-triggered: read until EAGAIN).
fn progress(conn: &mut Conn, flags: u32) -> Progress {
    if !conn.sent {
        if flags & (sys::OUT | sys::ERR_HUP) == 0 {
            return Progress::Wait;
        }
        match conn.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Progress::Failed(failure_kind(&e)),
        }
        match conn.stream.write(REQUEST) {
            Ok(n) if n == REQUEST.len() => conn.sent = true,
            Ok(_) => return Progress::Failed("short_write".into()),
            Err(e) => return Progress::Failed(failure_kind(&e)),
        }
    }
    let mut buf = [0u8; 256];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                return if conn.answer.starts_with(OK_PREFIX) {
                    Progress::Answered
                } else {
                    Progress::Failed("bad_response".into())
                };
            }
            Ok(n) => conn.answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Progress::Failed(failure_kind(&e)),
        }
    }
}

// ---------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------

/// One UDP run.
#[derive(Debug, Clone)]
pub struct UdpRun {
    /// Where the flows go, round robin.
    pub targets: Vec<SocketAddrV4>,
    /// Flows (sockets), each with one request outstanding.
    pub flows: usize,
    /// How long to run (warm-up included).
    pub duration: Duration,
    /// The first part of `duration` whose echoes are not counted.
    pub warmup: Duration,
    /// Generator threads.
    pub threads: usize,
}

/// What a UDP run saw.
#[derive(Debug, Clone, Default)]
pub struct UdpOutcome {
    /// Echoes received in the window.
    pub answered_in_window: u64,
    /// Requests sent (all).
    pub sent: u64,
    /// Requests given up after [`UDP_TIMEOUT`] (and sent again).
    pub lost: u64,
    /// Echoes that were not for the outstanding request (late ones).
    pub stale: u64,
    /// The window (duration − warm-up).
    pub window: Duration,
}

impl UdpOutcome {
    /// Echoes per second in the window.
    pub fn rate(&self) -> f64 {
        self.answered_in_window as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Runs `run` on `run.threads` threads (call it inside the client namespace).
pub fn udp(run: &UdpRun) -> Result<UdpOutcome> {
    let threads = run.threads.max(1);
    let t0 = Instant::now() + Duration::from_millis(5);
    // Sockets are made here, in the caller's namespace, and handed out.
    let mut per_thread: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..run.flows.max(1) {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect(run.targets[i % run.targets.len()])?;
        s.set_nonblocking(true)?;
        per_thread[i % threads].push(s);
    }
    let handles: Vec<_> = per_thread
        .into_iter()
        .enumerate()
        .map(|(t, sockets)| {
            let run = run.clone();
            thread::Builder::new()
                .name(format!("udp-load-{t}"))
                .spawn(move || udp_thread(&run, &sockets, t0))
        })
        .collect::<io::Result<_>>()?;
    let mut out = UdpOutcome {
        window: run.duration.saturating_sub(run.warmup),
        ..UdpOutcome::default()
    };
    for h in handles {
        let part = h.join().map_err(|_| anyhow!("a load thread panicked"))??;
        out.answered_in_window += part.answered_in_window;
        out.sent += part.sent;
        out.lost += part.lost;
        out.stale += part.stale;
    }
    Ok(out)
}

fn udp_thread(run: &UdpRun, sockets: &[UdpSocket], t0: Instant) -> Result<UdpOutcome> {
    sys::raise_priority();
    let ep = Epoll::new()?;
    for (i, s) in sockets.iter().enumerate() {
        ep.add(s.as_raw_fd(), sys::IN, i as u64)?;
    }
    let mut out = UdpOutcome::default();
    let mut seq = vec![0u64; sockets.len()];
    let mut sent_at = vec![t0; sockets.len()];
    let mut events = sys::event_buffer(256);
    let mut buf = [0u8; 64];
    let end = t0 + run.duration;
    let window_start = t0 + run.warmup;
    while Instant::now() < t0 {
        thread::sleep(Duration::from_micros(200));
    }
    let send = |i: usize, seq: u64, out: &mut UdpOutcome| {
        let mut payload = [0u8; 32];
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        // A full socket buffer or an ICMP error: the timeout resends.
        let _ = sockets[i].send(&payload);
        out.sent += 1;
    };
    let now = Instant::now();
    for (i, at) in sent_at.iter_mut().enumerate() {
        send(i, 0, &mut out);
        *at = now;
    }
    let mut last_sweep = now;
    loop {
        let now = Instant::now();
        if now >= end || lb_testkit::lab::interrupted() {
            break;
        }
        if now.duration_since(last_sweep) >= TICK {
            last_sweep = now;
            for i in 0..sockets.len() {
                if now.duration_since(sent_at[i]) >= UDP_TIMEOUT {
                    out.lost += 1;
                    seq[i] += 1;
                    send(i, seq[i], &mut out);
                    sent_at[i] = now;
                }
            }
        }
        let n = ep.wait(&mut events, Some(TICK))?;
        let now = Instant::now();
        for ev in &events[..n] {
            let i = sys::token(ev) as usize;
            let Some(socket) = sockets.get(i) else {
                continue;
            };
            loop {
                match socket.recv(&mut buf) {
                    Ok(len) if len >= 8 => {
                        let got = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                        if got != seq[i] {
                            out.stale += 1;
                            continue;
                        }
                        if now >= window_start && now < end {
                            out.answered_in_window += 1;
                        }
                        seq[i] += 1;
                        send(i, seq[i], &mut out);
                        sent_at[i] = now;
                    }
                    Ok(_) => out.stale += 1,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // WouldBlock, or an ICMP error reported on the socket.
                    Err(_) => break,
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile_us(&v, 50.0), 50.0);
        assert_eq!(percentile_us(&v, 99.0), 99.0);
        assert_eq!(percentile_us(&v, 100.0), 100.0);
        assert!(percentile_us(&[], 50.0).is_nan());
    }
}
