//! The agent's own DHCPv4 client (RFC 2131, options of RFC 2132), so a
//! thin VM gets its address from the host's dnsmasq whatever its image
//! holds. This module is the protocol: building and parsing packets
//! (pure functions) and the exchanges, over a [`Transport`] that
//! `network` implements with a UDP socket bound to the interface.
//!
//! ```text
//! acquire:  DISCOVER ──broadcast──▶ OFFER ◀── (first one with a server id)
//!           REQUEST  ──broadcast──▶ ACK  ◀── lease
//!                                   NAK  ◀── start again with DISCOVER
//! renew:    REQUEST (ciaddr) ──unicast at T1, broadcast at T2──▶ ACK | NAK
//! ```
//!
//! Every send is retried after 1, 2, 4, 8, 8… s until the caller's
//! deadline. Replies with another xid or hardware address, and packets
//! that do not parse, are ignored; parsing is bounded by the packet and
//! never panics.

mod packet;

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub use packet::{
    discover, opt, parse_reply, request_offer, request_renew, Identity, Lease, MessageType, Packet,
    PacketError, CLIENT_PORT, MAX_PACKET, SERVER_PORT,
};

const BACKOFF_SECS: [u64; 4] = [1, 2, 4, 8];

/// Errors of the DHCP client.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The chosen server's reply is unusable.
    #[error("bad reply")]
    Reply(#[from] PacketError),
    /// No fitting reply before the deadline.
    #[error("no answer from a DHCP server")]
    Timeout,
    /// The server refused the lease.
    #[error("the server refused the address (NAK)")]
    Nak,
    /// The caller stopped the exchange.
    #[error("stopped")]
    Stopped,
    /// The socket failed.
    #[error("socket")]
    Io(#[source] io::Error),
}

/// How the client sends and receives datagrams.
pub trait Transport {
    /// Sends `packet` to the server port of `to` (a server, or broadcast).
    fn send(&mut self, packet: &[u8], to: Ipv4Addr) -> io::Result<()>;
    /// Waits up to `timeout` for a datagram from a server port; its
    /// length, or `None` when the time is up (or the transport stopped).
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;
    /// Whether the caller wants the exchange to end.
    fn stopped(&self) -> bool {
        false
    }
}

/// A client for one interface.
#[derive(Debug, Clone)]
pub struct Client {
    /// Who the client says it is.
    pub identity: Identity,
}

impl Client {
    /// Gets a lease: DISCOVER, OFFER, REQUEST, ACK (a NAK starts over),
    /// giving up at `timeout`. `hint` is an address to ask for again.
    pub fn acquire(
        &self,
        t: &mut dyn Transport,
        timeout: Duration,
        mut hint: Option<Ipv4Addr>,
    ) -> Result<Lease, DhcpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let xid = random_xid();
            let offer = self.exchange(
                t,
                &discover(&self.identity, xid, hint),
                Ipv4Addr::BROADCAST,
                xid,
                deadline,
                |p| {
                    p.kind == MessageType::Offer
                        && !p.yiaddr.is_unspecified()
                        && matches!(p.addr(opt::SERVER_ID), Ok(Some(_)))
                },
            )?;
            let server = offer
                .addr(opt::SERVER_ID)?
                .ok_or(PacketError::Missing(opt::SERVER_ID))?;
            let request = request_offer(&self.identity, xid, offer.yiaddr, server);
            let asked = Instant::now();
            let reply = self.exchange(t, &request, Ipv4Addr::BROADCAST, xid, deadline, |p| {
                matches!(p.kind, MessageType::Ack | MessageType::Nak)
                    && matches!(p.addr(opt::SERVER_ID), Ok(Some(s)) if s == server)
            })?;
            if reply.kind == MessageType::Ack {
                return Ok(Lease::from_ack(&reply, asked)?);
            }
            hint = None;
        }
    }

    /// Extends `lease` with a REQUEST sent to `to` (the server at T1,
    /// broadcast at T2), giving up at `timeout`.
    pub fn renew(
        &self,
        t: &mut dyn Transport,
        lease: &Lease,
        to: Ipv4Addr,
        timeout: Duration,
    ) -> Result<Lease, DhcpError> {
        let xid = random_xid();
        let request = request_renew(&self.identity, xid, lease.address);
        let asked = Instant::now();
        let deadline = asked + timeout;
        let reply = self.exchange(t, &request, to, xid, deadline, |p| {
            matches!(p.kind, MessageType::Ack | MessageType::Nak)
        })?;
        match reply.kind {
            MessageType::Ack => Ok(Lease::from_ack(&reply, asked)?),
            _ => Err(DhcpError::Nak),
        }
    }

    /// Sends `packet` with back-off until a reply for this client that
    /// `wanted` accepts arrives, or `deadline` passes.
    fn exchange(
        &self,
        t: &mut dyn Transport,
        packet: &[u8],
        to: Ipv4Addr,
        xid: u32,
        deadline: Instant,
        wanted: impl Fn(&Packet) -> bool,
    ) -> Result<Packet, DhcpError> {
        let mut buf = vec![0u8; MAX_PACKET];
        for attempt in 0.. {
            if t.stopped() {
                return Err(DhcpError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // A failed send (no carrier yet, say) counts as a lost packet.
            let _ = t.send(packet, to);
            let wait = Duration::from_secs(BACKOFF_SECS[attempt.min(BACKOFF_SECS.len() - 1)]);
            let until = (now + wait).min(deadline);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() || t.stopped() {
                    break;
                }
                let Some(n) = t.recv(&mut buf, left).map_err(DhcpError::Io)? else {
                    break;
                };
                let Ok(p) = parse_reply(&buf[..n.min(buf.len())]) else {
                    continue;
                };
                if p.xid == xid && p.chaddr == self.identity.mac && wanted(&p) {
                    return Ok(p);
                }
            }
        }
        Err(DhcpError::Timeout)
    }
}

/// A random transaction id (getrandom; the clock if that fails).
fn random_xid() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: `b` is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == b.len() as isize {
        return u32::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32) ^ std::process::id()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::packet::tests::{id, reply, ADDR, MAC, SERVER};
    use super::packet::{decode, BOOTREQUEST};
    use super::*;

    /// A scripted server: each request the client sends is answered with
    /// what `script` returns.
    type Script = Box<dyn FnMut(&Packet, Ipv4Addr) -> Vec<Vec<u8>>>;

    struct Fake {
        script: Script,
        queue: VecDeque<Vec<u8>>,
        sent: Vec<(Packet, Ipv4Addr)>,
    }

    impl Fake {
        fn new(script: impl FnMut(&Packet, Ipv4Addr) -> Vec<Vec<u8>> + 'static) -> Self {
            Fake {
                script: Box::new(script),
                queue: VecDeque::new(),
                sent: Vec::new(),
            }
        }

        fn kinds(&self) -> Vec<MessageType> {
            self.sent.iter().map(|(p, _)| p.kind).collect()
        }
    }

    impl Transport for Fake {
        fn send(&mut self, packet: &[u8], to: Ipv4Addr) -> io::Result<()> {
            let p = decode(packet, BOOTREQUEST).expect("client sends valid requests");
            self.queue.extend((self.script)(&p, to));
            self.sent.push((p, to));
            Ok(())
        }

        fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
            match self.queue.pop_front() {
                Some(r) => {
                    buf[..r.len()].copy_from_slice(&r);
                    Ok(Some(r.len()))
                }
                None => {
                    std::thread::sleep(timeout.min(Duration::from_millis(2)));
                    Ok(None)
                }
            }
        }
    }

    fn client() -> Client {
        Client { identity: id() }
    }

    #[test]
    fn acquires_ignoring_strangers_and_restarting_on_nak() {
        let mut naks = 1;
        let mut fake = Fake::new(move |p, to| {
            assert_eq!(to, Ipv4Addr::BROADCAST);
            let other = Ipv4Addr::new(10, 0, 0, 99);
            match p.kind {
                MessageType::Discover => vec![
                    b"garbage".to_vec(),
                    reply(2, p.xid ^ 1, MAC, SERVER),
                    reply(2, p.xid, [9; 6], SERVER),
                    reply(2, p.xid, MAC, SERVER),
                ],
                // An ACK from another server is not for us; then one NAK.
                MessageType::Request if naks > 0 => {
                    naks -= 1;
                    vec![reply(5, p.xid, MAC, other), reply(6, p.xid, MAC, SERVER)]
                }
                _ => vec![reply(5, p.xid, MAC, SERVER)],
            }
        });
        let lease = client()
            .acquire(&mut fake, Duration::from_secs(5), None)
            .unwrap();
        assert_eq!((lease.address, lease.server), (ADDR, SERVER));
        use MessageType::*;
        assert_eq!(fake.kinds(), [Discover, Request, Discover, Request]);
        assert_ne!(
            fake.sent[0].0.xid, fake.sent[2].0.xid,
            "a new xid after the NAK"
        );
    }

    #[test]
    fn times_out_with_retries_when_nobody_answers() {
        let mut fake = Fake::new(|_, _| Vec::new());
        let e = client().acquire(&mut fake, Duration::from_millis(50), None);
        assert!(matches!(e, Err(DhcpError::Timeout)), "{e:?}");
        assert!(fake.sent.len() > 1, "retransmitted");
    }

    #[test]
    fn renews_at_the_server_and_reports_a_nak() {
        let lease = Lease::from_ack(
            &parse_reply(&reply(5, 1, MAC, SERVER)).unwrap(),
            Instant::now(),
        )
        .unwrap();
        let mut fake = Fake::new(|p, _| vec![reply(5, p.xid, MAC, SERVER)]);
        let renewed = client()
            .renew(&mut fake, &lease, SERVER, Duration::from_secs(5))
            .unwrap();
        assert_eq!((renewed.address, renewed.secs), (lease.address, lease.secs));
        assert_eq!(fake.sent[0].1, SERVER);
        assert_eq!(fake.sent[0].0.ciaddr, ADDR);
        let mut fake = Fake::new(|p, _| vec![reply(6, p.xid, MAC, SERVER)]);
        let e = client().renew(
            &mut fake,
            &lease,
            Ipv4Addr::BROADCAST,
            Duration::from_secs(5),
        );
        assert!(matches!(e, Err(DhcpError::Nak)), "{e:?}");
    }
}
