//! Client requests, meant to run on a thread inside the client namespace
//! (see [`super::Lab::in_client`]). Every request uses a fresh socket, so a
//! fresh source port and a new flow for the load balancer.

use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Connect and read timeout of every client socket.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// One HTTP GET on a new TCP connection; returns the body, trimmed (the
/// answering pod's name).
pub fn http_get(addr: SocketAddr) -> Result<String> {
    http_get_path(addr, "/")
}

/// One HTTP GET of `path` on a new TCP connection; returns the body, trimmed.
pub fn http_get_path(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: xtask-lab\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read HTTP response from {addr}"))?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("truncated HTTP response from {addr}: {response:?}");
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        bail!("unexpected HTTP status from {addr}: {head:?}");
    }
    Ok(body.trim().to_owned())
}

/// One UDP datagram from a new socket; returns the answer. Sends once more
/// (same socket) when the first answer does not come within [`TIMEOUT`].
pub fn udp_ask(addr: SocketAddr) -> Result<String> {
    udp_ask_from(0, addr, b"hello\n")
}

/// Like [`udp_ask`], but from local port `port` (0: any) and with `payload`
/// (e.g. [`super::server::WHOAMI_UDP`]).
pub fn udp_ask_from(port: u16, addr: SocketAddr, payload: &[u8]) -> Result<String> {
    let socket = UdpSocket::bind(("0.0.0.0", port))
        .with_context(|| format!("bind UDP socket to port {port}"))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 1500];
    for attempt in 0..2 {
        socket.send(payload)?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if attempt == 1 {
                    bail!("no UDP answer from {addr} after 2 tries");
                }
            }
            Err(e) => return Err(e).with_context(|| format!("UDP to {addr}")),
        }
    }
    unreachable!("the loop returns on its second attempt")
}

/// A long-lived TCP connection in echo mode.
#[derive(Debug)]
pub struct EchoConn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl EchoConn {
    /// Connects (call this inside the client namespace; the connection can
    /// then be used from any thread).
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
            .with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends `line`, reads the answer `<pod> <line>` and returns the pod.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        writeln!(self.writer, "{line}")?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            bail!("connection closed by the server");
        }
        let answer = answer.trim_end();
        match answer.split_once(' ') {
            Some((pod, echoed)) if echoed == line => Ok(pod.to_owned()),
            _ => bail!("unexpected echo answer {answer:?} to {line:?}"),
        }
    }
}

/// A long-lived [`EchoConn`] exercised every 100 ms on its own thread (at
/// most 1,000 exchanges), until [`Talker::finish`].
#[derive(Debug)]
pub struct Talker {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<Result<String, String>>>,
}

impl Talker {
    /// Starts talking on `conn`.
    pub fn start(mut conn: EchoConn) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut answers = Vec::new();
            let mut n = 0u32;
            while !flag.load(Ordering::SeqCst) && n < 1_000 {
                n += 1;
                let at = Instant::now();
                answers.push(conn.ask(&format!("line {n}")).map_err(|e| format!("{e:#}")));
                thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
            answers
        });
        Self { stop, thread }
    }

    /// Stops talking and returns every exchange's answer (the responder) or
    /// error, in order.
    pub fn finish(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .unwrap_or_else(|_| vec![Err("talker thread panicked".to_owned())])
    }
}

/// Answers counted by responder, and the errors.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Answers per responder name.
    pub by_pod: BTreeMap<String, usize>,
    /// Each answer in order (`None`: failed).
    pub answers: Vec<Option<String>>,
    /// The failures, in order.
    pub errors: Vec<String>,
}

impl Tally {
    /// Runs `request` `n` times and counts the results.
    pub fn collect(n: usize, mut request: impl FnMut() -> Result<String>) -> Self {
        let mut tally = Self::default();
        for _ in 0..n {
            if super::interrupted() {
                tally.errors.push("interrupted".to_owned());
                break;
            }
            tally.record(request());
        }
        tally
    }

    /// Adds one result.
    pub fn record(&mut self, result: Result<String>) {
        match result {
            Ok(pod) => {
                *self.by_pod.entry(pod.clone()).or_default() += 1;
                self.answers.push(Some(pod));
            }
            Err(e) => {
                self.errors.push(format!("{e:#}"));
                self.answers.push(None);
            }
        }
    }

    /// Number of requests made.
    pub fn total(&self) -> usize {
        self.answers.len()
    }

    /// Number answered.
    pub fn answered(&self) -> usize {
        self.by_pod.values().sum()
    }

    /// Answers from `pod`.
    pub fn count(&self, pod: &str) -> usize {
        self.by_pod.get(pod).copied().unwrap_or(0)
    }

    /// The share of answers from `pod`, 0.0..=1.0 (of the requests made).
    pub fn share(&self, pod: &str) -> f64 {
        if self.total() == 0 {
            return 0.0;
        }
        self.count(pod) as f64 / self.total() as f64
    }
}

impl fmt::Display for Tally {
    /// `answered/total` and the count per responder, e.g.
    /// `300/300 answered: pod-1=97 pod-2=104 pod-3=99`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} answered:", self.answered(), self.total())?;
        for (pod, n) in &self.by_pod {
            write!(f, " {pod}={n}")?;
        }
        if let Some(first) = self.errors.first() {
            write!(f, " ({} errors, first: {first})", self.errors.len())?;
        }
        Ok(())
    }
}
