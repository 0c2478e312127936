//! The few system calls the traffic generator and the toy servers need that
//! std does not wrap: epoll (with a sub-millisecond timeout), a non-blocking
//! `connect`, `accept4` and a larger listen backlog. Each `unsafe` block is a
//! single call whose pointers outlive it.

use std::{
    io,
    net::{SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    ptr,
    time::Duration,
};

/// Readable.
pub const IN: u32 = libc::EPOLLIN as u32;
/// Writable.
pub const OUT: u32 = libc::EPOLLOUT as u32;
/// Edge-triggered.
pub const ET: u32 = libc::EPOLLET as u32;
/// Error or hang-up (always reported).
pub const ERR_HUP: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// One ready descriptor: its token and its events.
pub type Event = libc::epoll_event;

/// The token of `ev` (a copy: the struct is packed on x86-64).
pub fn token(ev: &Event) -> u64 {
    ev.u64
}

/// The events of `ev`.
pub fn events(ev: &Event) -> u32 {
    ev.events
}

/// A zeroed event buffer of `n` slots for [`Epoll::wait`].
pub fn event_buffer(n: usize) -> Vec<Event> {
    vec![Event { events: 0, u64: 0 }; n]
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }.into())?;
        // SAFETY: a descriptor we just created and nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        })
    }

    /// Watches `fd` for `events`, reporting `token`. Closing `fd` removes it.
    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = Event { events, u64: token };
        // SAFETY: `ev` outlives the call.
        check(
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }
                .into(),
        )
        .map(drop)
    }

    /// Waits up to `timeout` (`None`: forever; nanosecond resolution through
    /// `epoll_pwait2`) and fills `out`; returns how many are ready. An
    /// interrupted wait returns 0.
    pub fn wait(&self, out: &mut [Event], timeout: Option<Duration>) -> io::Result<usize> {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(ptr::null(), |t| t as *const libc::timespec);
        let len = libc::c_int::try_from(out.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `out` and `ts` outlive the call; the kernel writes at most
        // `len` events.
        let r = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.fd.as_raw_fd(),
                out.as_mut_ptr(),
                len,
                ts_ptr,
                ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        match check(r) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// A non-blocking TCP socket with `connect(addr)` started (`EINPROGRESS`).
/// Wait for it to become writable, then read the outcome with
/// [`TcpStream::take_error`].
pub fn connect_nonblocking(addr: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: no pointers.
    let fd = check(
        unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        }
        .into(),
    )?;
    // SAFETY: a descriptor we just created and nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd as RawFd) };
    let sa = sockaddr(addr);
    // SAFETY: `sa` outlives the call and its size is passed.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            ptr::from_ref(&sa).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`: a non-blocking connection, or
/// `None` when none is pending.
pub fn accept_nonblocking(listener: &TcpListener) -> io::Result<Option<TcpStream>> {
    loop {
        // SAFETY: null address pointers are allowed (peer not wanted).
        let r = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                ptr::null_mut(),
                ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if r >= 0 {
            // SAFETY: a descriptor the kernel just gave us.
            return Ok(Some(unsafe { TcpStream::from_raw_fd(r) }));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => {}
            // A connection reset before we accepted it: try the next one.
            _ if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            _ => return Err(e),
        }
    }
}

/// Calls `listen` again with `backlog` (std uses 128; Linux caps it at
/// `net.core.somaxconn`).
pub fn set_backlog(listener: &TcpListener, backlog: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    check(unsafe { libc::listen(listener.as_raw_fd(), backlog) }.into()).map(drop)
}

/// Nice value of the generator and server threads: ahead of background
/// jobs (a compiler), the same for every system.
pub const NICE: i32 = -10;

/// Sets the calling thread's nice value to [`NICE`] (Linux nice values are
/// per thread). Best effort: without the privilege nothing changes.
pub fn raise_priority() {
    // SAFETY: no pointers; `who = 0` is the calling thread.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::Ipv4Addr,
    };

    use super::*;

    #[test]
    fn nonblocking_connect_accept_and_epoll_on_loopback() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        set_backlog(&listener, 1024).unwrap();
        listener.set_nonblocking(true).unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let ep = Epoll::new().unwrap();
        let mut client = connect_nonblocking(addr).unwrap();
        ep.add(client.as_raw_fd(), OUT | ET, 7).unwrap();
        let mut evs = event_buffer(4);
        let n = ep.wait(&mut evs, Some(Duration::from_secs(2))).unwrap();
        assert_eq!(n, 1);
        assert_eq!(token(&evs[0]), 7);
        assert!(events(&evs[0]) & OUT != 0);
        assert!(client.take_error().unwrap().is_none());
        client.write_all(b"hi").unwrap();
        let mut server = loop {
            if let Some(s) = accept_nonblocking(&listener).unwrap() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        server.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // Nothing pending any more.
        assert!(accept_nonblocking(&listener).unwrap().is_none());
        // Sub-millisecond timeouts return.
        let n = ep.wait(&mut evs, Some(Duration::from_micros(200))).unwrap();
        assert_eq!(n, 0);
    }
}
