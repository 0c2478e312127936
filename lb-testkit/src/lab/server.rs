//! The toy servers that play the pods: TCP (HTTP or line echo) and UDP on one
//! port, bound inside a namespace and served by threads of this process.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::netns::Netns;

/// How long a connection may stay silent before the server closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept and receive loops look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The HTTP path whose answer names the peer: `<label> <peer-ip>`.
pub const WHOAMI_PATH: &str = "/whoami";
/// A UDP datagram starting with this gets `<label> <peer-ip>`.
pub const WHOAMI_UDP: &[u8] = b"whoami";

/// Requests served, by protocol.
#[derive(Debug, Default)]
pub struct ServerCounts {
    /// TCP connections accepted.
    pub tcp: AtomicU64,
    /// UDP datagrams answered.
    pub udp: AtomicU64,
}

/// A server answering as `label` on TCP and UDP `port`; stops on drop.
///
/// TCP: a first line starting with `GET ` gets an HTTP/1.1 200 response with
/// `Connection: close` and body `<label>\n` (for the path [`WHOAMI_PATH`]:
/// `<label> <peer-ip>\n`, the source address the server saw); any other
/// first line starts echo mode, where each line gets `<label> <line>\n`
/// until EOF. UDP: each datagram gets `<label>` (a datagram that starts with
/// [`WHOAMI_UDP`]: `<label> <peer-ip>`).
#[derive(Debug)]
pub struct Server {
    label: String,
    stop: Arc<AtomicBool>,
    counts: Arc<ServerCounts>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `0.0.0.0:port` (TCP and UDP) inside `ns` and starts serving.
    pub fn start(ns: &Netns, label: &str, port: u16) -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let (tcp, udp) = ns
            .run(move || -> std::io::Result<_> {
                Ok((TcpListener::bind(addr)?, UdpSocket::bind(addr)?))
            })?
            .with_context(|| format!("bind {addr} in {}", ns.name()))?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(STOP_POLL))?;

        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(ServerCounts::default());
        let mut threads = Vec::new();
        {
            let (label, stop, counts) = (label.to_owned(), stop.clone(), counts.clone());
            threads.push(
                thread::Builder::new()
                    .name(format!("{label}-tcp"))
                    .spawn(move || accept_loop(&tcp, &label, &stop, &counts))?,
            );
        }
        {
            let (label, stop, counts) = (label.to_owned(), stop.clone(), counts.clone());
            threads.push(
                thread::Builder::new()
                    .name(format!("{label}-udp"))
                    .spawn(move || udp_loop(&udp, &label, &stop, &counts))?,
            );
        }
        Ok(Self {
            label: label.to_owned(),
            stop,
            counts,
            threads,
        })
    }

    /// The name the server answers with.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// What it has served so far.
    pub fn counts(&self) -> &ServerCounts {
        &self.counts
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, label: &str, stop: &AtomicBool, counts: &ServerCounts) {
    let timeout = PollTimeout::from(u16::try_from(STOP_POLL.as_millis()).unwrap_or(u16::MAX));
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout).unwrap_or(0) == 0 {
            continue;
        }
        while let Ok((stream, peer)) = listener.accept() {
            counts.tcp.fetch_add(1, Ordering::Relaxed);
            let label = label.to_owned();
            // Connection threads are detached: they end at EOF or after
            // IDLE_TIMEOUT, even if the lab is gone.
            let _ = thread::Builder::new()
                .name(format!("{label}-conn"))
                .spawn(move || {
                    let _ = serve_tcp(stream, &label, peer);
                });
        }
    }
}

fn serve_tcp(stream: TcpStream, label: &str, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    if line.starts_with("GET ") {
        // Read the headers up to the empty line, then answer and close.
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
                break;
            }
        }
        let whoami = line.split_whitespace().nth(1) == Some(WHOAMI_PATH);
        let body = if whoami {
            format!("{label} {}\n", peer.ip())
        } else {
            format!("{label}\n")
        };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
        return writer.shutdown(std::net::Shutdown::Write);
    }
    loop {
        writeln!(writer, "{label} {}", line.trim_end())?;
        writer.flush()?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
    }
}

fn udp_loop(socket: &UdpSocket, label: &str, stop: &AtomicBool, counts: &ServerCounts) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((len, peer)) = socket.recv_from(&mut buf) {
            counts.udp.fetch_add(1, Ordering::Relaxed);
            if buf[..len].starts_with(WHOAMI_UDP) {
                let _ = socket.send_to(format!("{label} {}", peer.ip()).as_bytes(), peer);
            } else {
                let _ = socket.send_to(label.as_bytes(), peer);
            }
        }
    }
}
