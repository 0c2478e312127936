//! The pods' servers: one thread per pod namespace, epoll, no thread per
//! connection (the lab's [`lb_testkit::lab::server`] spawns one per connection,
//! far too dear at tens of thousands of connections a second on 2 cores).
//!
//! TCP: bound to `0.0.0.0:port`, so one server answers on every address its
//! namespace owns. It reads one request (up to the blank line), answers
//! `HTTP/1.0 200` with the address that served as the body, and closes
//! first: the server holds TIME_WAIT, as an HTTP/1.0 or `Connection: close`
//! server does. Each answer is counted by the local address that served it.
//!
//! UDP: one socket per given address (a socket bound to `0.0.0.0` would
//! answer from the namespace's primary address, not from the one the
//! datagram was sent to); each datagram is echoed as is.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};

use super::sys::{self, Epoll};
use lb_testkit::lab::netns::Netns;

/// How often a server looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Listen backlog (capped by `net.core.somaxconn`, 4096 by default).
const BACKLOG: i32 = 4096;
/// The request the load generator sends.
pub const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
/// The start of a good answer.
pub const OK_PREFIX: &[u8] = b"HTTP/1.0 200 ";
/// The longest request a connection may send before it is dropped.
const MAX_REQUEST: usize = 1024;
/// Token of the listening socket.
const LISTENER: u64 = u64::MAX;

/// Answers per serving address.
pub type Served = BTreeMap<Ipv4Addr, u64>;

/// A server thread; stopped on drop.
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<Served>>,
    thread: Option<JoinHandle<io::Result<()>>>,
    name: String,
}

impl Server {
    /// A TCP server on `0.0.0.0:port` inside `ns`.
    pub fn tcp(ns: &Netns, port: u16) -> Result<Self> {
        let listener = ns
            .run(move || -> io::Result<TcpListener> {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                sys::set_backlog(&l, BACKLOG)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("bind TCP 0.0.0.0:{port} in {}", ns.name()))?;
        Self::spawn(format!("{}-tcp", ns.name()), move |stop, served| {
            serve_tcp(&listener, stop, served)
        })
    }

    /// A UDP echo server with one socket per address of `addrs` (which `ns`
    /// must own), on `port`.
    pub fn udp(ns: &Netns, addrs: &[Ipv4Addr], port: u16) -> Result<Self> {
        let addrs = addrs.to_vec();
        let sockets = ns
            .run(move || -> io::Result<Vec<UdpSocket>> {
                addrs
                    .iter()
                    .map(|&a| {
                        let s = UdpSocket::bind((a, port))?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })
                    .collect()
            })?
            .with_context(|| format!("bind UDP sockets in {}", ns.name()))?;
        Self::spawn(format!("{}-udp", ns.name()), move |stop, served| {
            serve_udp(&sockets, stop, served)
        })
    }

    fn spawn(
        name: String,
        body: impl FnOnce(&AtomicBool, &Mutex<Served>) -> io::Result<()> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Served::new()));
        let thread = {
            let (stop, served) = (stop.clone(), served.clone());
            thread::Builder::new().name(name.clone()).spawn(move || {
                sys::raise_priority();
                body(&stop, &served)
            })?
        };
        Ok(Self {
            stop,
            served,
            thread: Some(thread),
            name,
        })
    }

    /// The answers counted since the last call, by serving address.
    pub fn take_served(&self) -> Served {
        std::mem::take(&mut *self.served.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops the thread; fails with its error if it failed.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("server {} panicked", self.name))?
                .with_context(|| format!("server {}", self.name)),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            eprintln!("traffic: {e:#}");
        }
    }
}

fn count(served: &Mutex<Served>, addr: Ipv4Addr) {
    *served
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(addr)
        .or_default() += 1;
}

/// A connection waiting for the rest of its request.
struct Pending {
    stream: TcpStream,
    request: Vec<u8>,
}

/// What reading a connection's request led to.
enum Step {
    /// Answered (or given up on): close it.
    Done,
    /// More to read later.
    Wait,
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool, served: &Mutex<Served>) -> io::Result<()> {
    let ep = Epoll::new()?;
    ep.add(listener.as_raw_fd(), sys::IN, LISTENER)?;
    let mut events = sys::event_buffer(256);
    let mut pending: Vec<Option<Pending>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = ep.wait(&mut events, Some(STOP_POLL))?;
        for ev in &events[..n] {
            let token = sys::token(ev);
            if token == LISTENER {
                while let Some(stream) = sys::accept_nonblocking(listener)? {
                    let mut conn = Pending {
                        stream,
                        request: Vec::new(),
                    };
                    if let Step::Wait = step(&mut conn, served) {
                        let slot = free.pop().unwrap_or_else(|| {
                            pending.push(None);
                            pending.len() - 1
                        });
                        // Edge-triggered: `step` read until EAGAIN.
                        ep.add(conn.stream.as_raw_fd(), sys::IN | sys::ET, slot as u64)?;
                        pending[slot] = Some(conn);
                    }
                }
            } else {
                let slot = token as usize;
                let done = match pending.get_mut(slot).and_then(Option::as_mut) {
                    Some(conn) => matches!(step(conn, served), Step::Done),
                    None => false,
                };
                if done {
                    // Dropping the stream closes it (and leaves the epoll set).
                    pending[slot] = None;
                    free.push(slot);
                }
            }
        }
    }
    Ok(())
}

/// Reads what the connection has; answers and says `Done` once the request
/// is complete (or on EOF or error).
fn step(conn: &mut Pending, served: &Mutex<Served>) -> Step {
    let mut buf = [0u8; 512];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => return Step::Done,
            Ok(n) => {
                conn.request.extend_from_slice(&buf[..n]);
                if conn.request.ends_with(b"\r\n\r\n") {
                    answer(&mut conn.stream, served);
                    return Step::Done;
                }
                if conn.request.len() > MAX_REQUEST {
                    return Step::Done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Done,
        }
    }
}

fn answer(stream: &mut TcpStream, served: &Mutex<Served>) {
    let Ok(SocketAddr::V4(local)) = stream.local_addr() else {
        return;
    };
    let body = format!("{}\n", local.ip());
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A fresh socket's send buffer takes this small answer whole.
    if stream.write(response.as_bytes()).ok() == Some(response.len()) {
        count(served, *local.ip());
    }
}

fn serve_udp(sockets: &[UdpSocket], stop: &AtomicBool, served: &Mutex<Served>) -> io::Result<()> {
    let ep = Epoll::new()?;
    for (i, s) in sockets.iter().enumerate() {
        ep.add(s.as_raw_fd(), sys::IN, i as u64)?;
    }
    let addrs: Vec<Ipv4Addr> = sockets
        .iter()
        .map(|s| match s.local_addr() {
            Ok(SocketAddr::V4(a)) => *a.ip(),
            _ => Ipv4Addr::UNSPECIFIED,
        })
        .collect();
    let mut events = sys::event_buffer(64);
    let mut buf = [0u8; 2048];
    let mut local_counts = vec![0u64; sockets.len()];
    while !stop.load(Ordering::Relaxed) {
        let n = ep.wait(&mut events, Some(STOP_POLL))?;
        for ev in &events[..n] {
            let i = sys::token(ev) as usize;
            let Some(socket) = sockets.get(i) else {
                continue;
            };
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((len, peer)) => {
                        if socket.send_to(&buf[..len], peer).is_ok() {
                            local_counts[i] += 1;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        // Publish once per wake-up, not once per datagram.
        if local_counts.iter().any(|&c| c > 0) {
            let mut map = served.lock().unwrap_or_else(|e| e.into_inner());
            for (i, c) in local_counts.iter_mut().enumerate() {
                if *c > 0 {
                    *map.entry(addrs[i]).or_default() += *c;
                    *c = 0;
                }
            }
        }
    }
    Ok(())
}
