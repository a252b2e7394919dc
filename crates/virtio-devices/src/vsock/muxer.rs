//! Routes vsock packets between the guest and host Unix sockets
//! (Firecracker's hybrid model).
//!
//! * Host → guest: a client connects to the listening socket at `path` and
//!   writes `CONNECT <port>\n`; we send the guest a REQUEST for `port` from
//!   a fresh host port, and when the guest answers RESPONSE we write
//!   `OK <host port>\n` to the client. Then bytes flow both ways.
//! * Guest → host: a REQUEST for host port `P` connects (without blocking)
//!   to the Unix socket `<path>_P`; success answers RESPONSE, failure RST.
//!
//! Every host socket is non-blocking and registered with the worker's
//! epoll only for the events the connection can act on, so a full receive
//! queue or exhausted credit never makes the loop spin.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnState, Connection, RxPacket};
use super::packet::{op, Header, HOST_CID, TYPE_STREAM};
use crate::ratelimit::LogLimiter;
use crate::worker::{EpollCtx, EventToken};

/// Raw token of the listening socket.
const LISTENER_TOKEN: u64 = 1 << 32;
/// First raw token handed to host sockets.
const FIRST_CONN_TOKEN: u64 = LISTENER_TOKEN + 1;

/// Events of the vsock worker: its queues and timer, and the host sockets
/// the muxer watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The guest added receive buffers.
    RxQueue,
    /// The guest sent packets.
    TxQueue,
    /// The guest added event buffers (unused: we send no events).
    EventQueue,
    /// Connection set-up timeouts (armed only while set-ups are pending).
    Timer,
    /// A host client connects.
    Listener,
    /// A host socket is ready (the muxer's id for it).
    Conn(u64),
}

impl EventToken for Token {
    fn to_raw(self) -> u64 {
        match self {
            Token::RxQueue => 0,
            Token::TxQueue => 1,
            Token::EventQueue => 2,
            Token::Timer => 3,
            Token::Listener => LISTENER_TOKEN,
            Token::Conn(t) => t,
        }
    }
    fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Token::RxQueue,
            1 => Token::TxQueue,
            2 => Token::EventQueue,
            3 => Token::Timer,
            LISTENER_TOKEN => Token::Listener,
            t if t >= FIRST_CONN_TOKEN => Token::Conn(t),
            _ => return None,
        })
    }
}
/// Most simultaneous connections (each may buffer 256 KiB).
pub const MAX_CONNECTIONS: usize = 256;
/// Most RSTs queued for the guest while its receive queue is full.
const MAX_PENDING_RSTS: usize = 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host client may take to send its `CONNECT` line, and the
/// guest to answer our REQUEST, before the attempt is dropped.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(2);
/// First host port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

type ConnKey = (u32, u32); // (host port, guest port)

/// A host client that has not finished its `CONNECT` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// Parses `CONNECT <port>\n`.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let rest = s
        .strip_prefix("CONNECT ")?
        .trim_end_matches('\n')
        .trim_end_matches('\r');
    rest.trim().parse().ok()
}

/// Connects to a Unix socket without blocking: a listener with a full
/// backlog refuses instead of stalling the worker.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed it.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

enum LineRead {
    /// No full line yet; wait for more.
    Incomplete,
    /// A full line, or why there will never be one.
    Done(Result<(), &'static str>),
}

/// Reads byte by byte (so no stream data after the line is consumed) until
/// a newline.
fn read_line(stream: &mut UnixStream, line: &mut Vec<u8>) -> LineRead {
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return LineRead::Done(Err("closed before CONNECT")),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::Incomplete,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return LineRead::Done(Err("read error")),
        }
        if byte[0] == b'\n' {
            return LineRead::Done(Ok(()));
        }
        if line.len() >= MAX_CONNECT_LINE {
            return LineRead::Done(Err("CONNECT line too long"));
        }
    }
}

/// The connection multiplexer of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    by_token: HashMap<u64, ConnKey>,
    pending_hosts: HashMap<u64, PendingHost>,
    rx_ready: VecDeque<ConnKey>,
    rsts: VecDeque<Header>,
    next_token: u64,
    /// The next host port for a host-initiated connection, shared with
    /// the device, which keeps it across snapshots (see
    /// [`Self::with_local_ports`]).
    next_local_port: Arc<AtomicU32>,
    log: LogLimiter,
}

impl Muxer {
    /// A muxer for guest `guest_cid` over `listener` bound at `path`.
    pub fn new(guest_cid: u64, path: PathBuf, listener: UnixListener) -> Self {
        Muxer {
            guest_cid,
            path,
            listener,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending_hosts: HashMap::new(),
            rx_ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: Arc::new(AtomicU32::new(FIRST_LOCAL_PORT)),
            log: LogLimiter::new(format!("vsock cid {guest_cid}")),
        }
    }

    /// The same muxer, taking host ports from `ports`. A restored VM goes
    /// on from where its snapshot was taken: a guest still holds sockets
    /// of connections it was closing then, and a new connection from the
    /// same (host port, guest port) would meet one of them and be reset.
    pub fn with_local_ports(mut self, ports: Arc<AtomicU32>) -> Self {
        self.next_local_port = ports;
        self
    }

    /// The limiter for log lines the guest triggers.
    pub fn log(&self) -> &LogLimiter {
        &self.log
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Registers the listening socket, and the sockets of host clients
    /// and connections a worker before this one watched (a worker started
    /// again over the same handler, for a snapshot).
    pub fn register(&self, ctx: &EpollCtx<Token>) -> io::Result<()> {
        ctx.add(self.listener.as_raw_fd(), Token::Listener, EventSet::IN)?;
        for (&token, p) in &self.pending_hosts {
            ctx.add(p.stream.as_raw_fd(), Token::Conn(token), EventSet::IN)?;
        }
        for c in self.conns.values().filter(|c| !c.registered.is_empty()) {
            ctx.add(c.stream.as_raw_fd(), Token::Conn(c.token), c.registered)?;
        }
        Ok(())
    }

    /// Whether a connection is being set up (a host client before its
    /// `CONNECT` line, or a REQUEST the guest has not answered): the worker
    /// then runs a timer to call [`Self::expire`].
    pub fn has_pending_setups(&self) -> bool {
        !self.pending_hosts.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.state == ConnState::LocalInit && !c.is_resetting())
    }

    /// Drops set-ups older than [`SETUP_TIMEOUT`]: silent host clients are
    /// closed, unanswered REQUESTs are reset (RST to the guest, the host
    /// client sees its socket close).
    pub fn expire(&mut self, ctx: &EpollCtx<Token>, now: Instant) {
        let old = |t: Instant| now.saturating_duration_since(t) >= SETUP_TIMEOUT;
        let stale: Vec<u64> = self
            .pending_hosts
            .iter()
            .filter(|(_, p)| old(p.since))
            .map(|(t, _)| *t)
            .collect();
        for token in stale {
            if let Some(p) = self.pending_hosts.remove(&token) {
                log::debug!("vsock: host client sent no CONNECT line in time");
                let _ = ctx.remove(p.stream.as_raw_fd());
            }
        }
        let unanswered: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == ConnState::LocalInit && !c.is_resetting() && old(c.created))
            .map(|(k, _)| *k)
            .collect();
        for key in unanswered {
            log::info!(
                "vsock: the guest did not answer a connection to port {} within {SETUP_TIMEOUT:?}: reset",
                key.1
            );
            if let Some(c) = self.conns.get_mut(&key) {
                c.reset();
            }
            self.after_change(ctx, key);
        }
    }

    /// Whether there is anything for the guest's receive queue.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_ready.is_empty()
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn queue_rst(&mut self, to: &Header) {
        if to.op == op::RST || self.rsts.len() >= MAX_PENDING_RSTS {
            return;
        }
        self.rsts.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    fn schedule_rx(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rx_queue && c.has_rx_work() {
                c.in_rx_queue = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Registers, modifies or removes the connection's fd so epoll reports
    /// exactly what it can act on.
    fn sync_interest(&mut self, ctx: &EpollCtx<Token>, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.wanted_events();
        if want == c.registered {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let r = if want.is_empty() {
            ctx.remove(fd)
        } else if c.registered.is_empty() {
            ctx.add(fd, Token::Conn(c.token), want)
        } else {
            ctx.modify(fd, Token::Conn(c.token), want)
        };
        match r {
            Ok(()) => c.registered = want,
            Err(e) => log::warn!("vsock: epoll update for port {}: {e}", c.local_port),
        }
    }

    fn remove_conn(&mut self, ctx: &EpollCtx<Token>, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            if !c.registered.is_empty() {
                let _ = ctx.remove(c.stream.as_raw_fd());
            }
            self.by_token.remove(&c.token);
        }
    }

    fn after_change(&mut self, ctx: &EpollCtx<Token>, key: ConnKey) {
        self.schedule_rx(key);
        self.sync_interest(ctx, key);
    }

    /// Accepts host clients.
    pub fn handle_listener(&mut self, ctx: &EpollCtx<Token>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: accept: {e}");
                    return;
                }
            };
            if self.conns.len() + self.pending_hosts.len() >= MAX_CONNECTIONS {
                log::warn!("vsock: too many connections, refusing host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("vsock: {e}");
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = ctx.add(stream.as_raw_fd(), Token::Conn(token), EventSet::IN) {
                log::warn!("vsock: epoll add: {e}");
                continue;
            }
            self.pending_hosts.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
    }

    /// An event on a host socket.
    pub fn handle_conn_event(&mut self, ctx: &EpollCtx<Token>, token: u64, events: EventSet) {
        if self.pending_hosts.contains_key(&token) {
            self.read_connect_line(ctx, token);
            return;
        }
        let Some(&key) = self.by_token.get(&token) else {
            log::debug!("vsock: event for unknown token {token}");
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            c.set_host_readable();
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            if let Err(e) = c.flush() {
                log::debug!("vsock: port {}: {e}", c.local_port);
                c.reset();
            }
        }
        self.after_change(ctx, key);
    }

    fn read_connect_line(&mut self, ctx: &EpollCtx<Token>, token: u64) {
        let Some(p) = self.pending_hosts.get_mut(&token) else {
            return;
        };
        let done = match read_line(&mut p.stream, &mut p.line) {
            LineRead::Incomplete => return,
            LineRead::Done(r) => r,
        };
        let Some(p) = self.pending_hosts.remove(&token) else {
            return;
        };
        let _ = ctx.remove(p.stream.as_raw_fd());
        let port =
            match done.and_then(|()| parse_connect_line(&p.line).ok_or("malformed CONNECT line")) {
                Ok(port) => port,
                Err(why) => {
                    log::debug!("vsock: host client dropped: {why}");
                    return;
                }
            };
        let Some(local) = self.alloc_local_port(port) else {
            log::warn!("vsock: no free host port");
            return;
        };
        let conn = Connection::new_local(p.stream, token, local, port, self.guest_cid);
        let key = (local, port);
        self.conns.insert(key, conn);
        self.by_token.insert(token, key);
        self.after_change(ctx, key);
    }

    fn alloc_local_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            // Only this worker changes it (the device reads it paused).
            let p = self
                .next_local_port
                .load(Ordering::Relaxed)
                .max(FIRST_LOCAL_PORT);
            let next = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            self.next_local_port.store(next, Ordering::Relaxed);
            if !self.conns.contains_key(&(p, peer)) {
                return Some(p);
            }
        }
        None
    }

    /// A packet from the guest's transmit queue.
    pub fn handle_tx_packet(&mut self, ctx: &EpollCtx<Token>, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            crate::guest_log!(
                self.log,
                log::Level::Debug,
                "vsock: dropped packet {} -> {}",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.queue_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == op::REQUEST {
            self.guest_connect(ctx, hdr, key);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.queue_rst(hdr);
            return;
        };
        c.update_peer_credit(hdr);
        match hdr.op {
            op::RST => {
                self.remove_conn(ctx, key);
                return;
            }
            op::RESPONSE if c.state == ConnState::LocalInit => c.guest_accepted(),
            op::RW if c.state == ConnState::Established => {
                if let Err(e) = c.guest_data(payload) {
                    crate::guest_log!(
                        self.log,
                        log::Level::Debug,
                        "vsock: port {}: {e}",
                        c.local_port
                    );
                    c.reset();
                }
            }
            op::SHUTDOWN => {
                c.guest_shutdown(hdr.flags);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => c.credit_requested(),
            _ => c.reset(),
        }
        self.after_change(ctx, key);
    }

    fn guest_connect(&mut self, ctx: &EpollCtx<Token>, hdr: &Header, key: ConnKey) {
        if self.conns.contains_key(&key)
            || self.conns.len() + self.pending_hosts.len() >= MAX_CONNECTIONS
        {
            self.queue_rst(hdr);
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), hdr.dst_port));
        let stream = match connect_nonblocking(&target) {
            Ok(s) => s,
            Err(e) => {
                crate::guest_log!(
                    self.log,
                    log::Level::Debug,
                    "vsock: guest connect to {}: {e}",
                    target.display()
                );
                self.queue_rst(hdr);
                return;
            }
        };
        let token = self.alloc_token();
        self.conns.insert(
            key,
            Connection::new_peer(stream, token, hdr, self.guest_cid),
        );
        self.by_token.insert(token, key);
        self.after_change(ctx, key);
    }

    /// The next packet for a guest receive buffer with room for `capacity`
    /// payload bytes, or `None` if nothing is ready.
    pub fn next_rx_packet(
        &mut self,
        ctx: &EpollCtx<Token>,
        capacity: usize,
    ) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.rsts.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rx_queue = false;
            match c.next_rx_packet(capacity) {
                Some(RxPacket::Reset(h)) => {
                    self.remove_conn(ctx, key);
                    return Some((h, Vec::new()));
                }
                Some(RxPacket::Packet(h, data)) => {
                    self.after_change(ctx, key);
                    return Some((h, data));
                }
                None => self.sync_interest(ctx, key),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\r\n"),
            Some(u32::MAX)
        );
        assert_eq!(parse_connect_line(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect_line(b"connect 52\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT\n"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }
}
