//! One vsock stream between a guest port and a host Unix socket, with
//! virtio-vsock credit-based flow control.
//!
//! Credit: we tell the guest our receive buffer is [`CONN_BUF_SIZE`] bytes
//! and how many bytes we have forwarded to the host socket (`fwd_cnt`); the
//! guest never has more than that buffer in flight. Data the host socket
//! does not take at once waits in `tx_buf`, which therefore never exceeds
//! the buffer we advertised (a guest that overruns it is reset). In the
//! other direction we never send more than the guest's advertised
//! `buf_alloc - (rx_cnt - peer_fwd_cnt)`; while that is zero the host
//! socket is not read (so the host writer is held back), and we send one
//! CREDIT_REQUEST: Linux reports what its reader consumed only once most
//! of its buffer is free or empty, and answers a request at once.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    op, Header, HOST_CID, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise per connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Forwarded bytes after which we volunteer a credit update.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Errors of one connection; each resets it.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit we gave it.
    #[error("guest overran its credit ({0} bytes buffered)")]
    CreditOverrun(usize),
    /// The host socket failed.
    #[error("host socket")]
    Io(#[source] io::Error),
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected; we sent (or will send) REQUEST to the guest.
    LocalInit,
    /// Both sides agreed.
    Established,
}

/// Control packets owed to the guest.
mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
    pub const RST: u8 = 8;
}

/// Why no data goes to the guest now (see [`Connection::data_blocked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataBlock {
    /// Data may go.
    No,
    /// Nothing to send (not established, host drained or closed, guest
    /// shut down receiving).
    Nothing,
    /// Host data may be waiting, but the guest gave no credit.
    Credit,
}

/// What the connection has for the guest's next receive buffer.
pub enum RxPacket {
    /// Send this packet.
    Packet(Header, Vec<u8>),
    /// Send this RST, then forget the connection.
    Reset(Header),
}

/// A vsock stream connection.
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Epoll token of `stream`.
    pub token: u64,
    /// Host port (source port of our packets).
    pub local_port: u32,
    /// Guest port.
    pub peer_port: u32,
    /// State.
    pub state: ConnState,
    /// When the connection was created (for set-up timeouts).
    pub created: Instant,
    guest_cid: u64,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (the `OK` line), not guest data.
    uncounted: usize,
    pending: u8,
    host_readable: bool,
    host_eof: bool,
    /// A CREDIT_REQUEST went out for the credit we have now.
    credit_requested: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    /// In the muxer's receive round-robin.
    pub in_rx_queue: bool,
    /// Events currently registered with epoll (empty: not registered).
    pub registered: EventSet,
}

impl Connection {
    fn new(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: ConnState,
    ) -> Self {
        Connection {
            stream,
            token,
            local_port,
            peer_port,
            state,
            created: Instant::now(),
            guest_cid,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            uncounted: 0,
            pending: 0,
            host_readable: false,
            host_eof: false,
            credit_requested: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            in_rx_queue: false,
            registered: EventSet::empty(),
        }
    }

    /// A host-initiated connection to guest port `peer_port`.
    pub fn new_local(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
    ) -> Self {
        let mut c = Self::new(
            stream,
            token,
            local_port,
            peer_port,
            guest_cid,
            ConnState::LocalInit,
        );
        c.pending = pending::REQUEST;
        c
    }

    /// A guest-initiated connection (its REQUEST was `hdr`), accepted.
    pub fn new_peer(stream: UnixStream, token: u64, hdr: &Header, guest_cid: u64) -> Self {
        let mut c = Self::new(
            stream,
            token,
            hdr.dst_port,
            hdr.src_port,
            guest_cid,
            ConnState::Established,
        );
        c.update_peer_credit(hdr);
        c.pending = pending::RESPONSE;
        c
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        if hdr.buf_alloc != self.peer_buf_alloc || hdr.fwd_cnt != self.peer_fwd_cnt.0 {
            // New information: if it is still no credit, ask again later.
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx_work(&self) -> bool {
        self.pending != 0 || self.can_send_data() || self.wants_credit_request()
    }

    fn data_blocked(&self) -> DataBlock {
        if self.state != ConnState::Established
            || !self.host_readable
            || self.host_eof
            || self.guest_shut_rcv
        {
            DataBlock::Nothing
        } else if self.peer_credit() == 0 {
            DataBlock::Credit
        } else {
            DataBlock::No
        }
    }

    fn can_send_data(&self) -> bool {
        self.data_blocked() == DataBlock::No
    }

    /// Out of credit with host data waiting, and not asked yet.
    fn wants_credit_request(&self) -> bool {
        self.data_blocked() == DataBlock::Credit && !self.credit_requested
    }

    /// The epoll events the connection needs now.
    pub fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.pending & pending::RST != 0 {
            return ev;
        }
        if self.state == ConnState::Established
            && !self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
        {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Resets the connection: an RST goes to the guest next, then it is
    /// dropped.
    pub fn reset(&mut self) {
        self.pending = pending::RST;
        self.tx_buf.clear();
        self.uncounted = 0;
    }

    /// Whether the connection is waiting to send its final RST.
    pub fn is_resetting(&self) -> bool {
        self.pending & pending::RST != 0
    }

    /// The host socket is readable (or hung up).
    pub fn set_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The guest accepted our REQUEST: tell the host client which port.
    pub fn guest_accepted(&mut self) {
        self.state = ConnState::Established;
        let line = format!("OK {}\n", self.local_port);
        self.uncounted += line.len();
        self.tx_buf.extend(line.as_bytes());
        if let Err(e) = self.flush() {
            log::debug!("vsock: {e}");
            self.reset();
        }
    }

    /// The guest asked for our credit.
    pub fn credit_requested(&mut self) {
        self.pending |= pending::CREDIT_UPDATE;
    }

    /// Guest data for the host socket.
    pub fn guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.guest_shut_send || self.is_resetting() {
            return Ok(());
        }
        let buffered = self.tx_buf.len().saturating_sub(self.uncounted) + data.len();
        if buffered > CONN_BUF_SIZE as usize {
            return Err(ConnError::CreditOverrun(buffered));
        }
        self.tx_buf.extend(data);
        self.flush()
    }

    /// The guest shut down one or both directions. Returns `true` when the
    /// connection is finished (an RST is now pending).
    pub fn guest_shutdown(&mut self, flags: u32) -> bool {
        self.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.finish_if_done()
    }

    fn finish_if_done(&mut self) -> bool {
        if self.guest_shut_send && self.tx_buf.is_empty() {
            let _ = self.stream.shutdown(Shutdown::Write);
            if self.guest_shut_rcv {
                self.pending = pending::RST;
                return true;
            }
        }
        false
    }

    /// Writes buffered guest data to the host socket as far as it goes.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.uncounted);
                    self.uncounted -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
        self.finish_if_done();
        Ok(())
    }

    /// The next packet for the guest, given room for `capacity` payload
    /// bytes; `None` when there is nothing to send right now.
    pub fn next_rx_packet(&mut self, capacity: usize) -> Option<RxPacket> {
        if self.pending & pending::RST != 0 {
            return Some(RxPacket::Reset(self.header(op::RST)));
        }
        for (bit, op) in [
            (pending::REQUEST, op::REQUEST),
            (pending::RESPONSE, op::RESPONSE),
            (pending::CREDIT_UPDATE, op::CREDIT_UPDATE),
        ] {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                return Some(RxPacket::Packet(self.header(op), Vec::new()));
            }
        }
        if self.wants_credit_request() {
            self.credit_requested = true;
            return Some(RxPacket::Packet(
                self.header(op::CREDIT_REQUEST),
                Vec::new(),
            ));
        }
        if !self.can_send_data() {
            return None;
        }
        let want = capacity
            .min(self.peer_credit() as usize)
            .min(MAX_PKT_PAYLOAD);
        if want == 0 {
            return None;
        }
        let mut buf = vec![0u8; want];
        let read = loop {
            match self.stream.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match read {
            Ok(0) => {
                // The host will send no more.
                self.host_eof = true;
                let mut h = self.header(op::SHUTDOWN);
                h.flags = SHUTDOWN_SEND;
                Some(RxPacket::Packet(h, Vec::new()))
            }
            Ok(n) => {
                buf.truncate(n);
                self.rx_cnt += Wrapping(n as u32);
                Some(RxPacket::Packet(self.header(op::RW), buf))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(e) => {
                log::debug!("vsock: host read: {e}");
                self.reset();
                Some(RxPacket::Reset(self.header(op::RST)))
            }
        }
    }
}
