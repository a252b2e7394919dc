//! DHCP messages: building the client's and parsing the server's, as
//! pure functions (RFC 2131 header, RFC 2132 options, RFC 3396 split
//! options, option overload). Parsing is bounded by the packet: anything
//! malformed is an error, never a panic.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The server's UDP port.
pub const SERVER_PORT: u16 = 67;
/// The client's UDP port.
pub const CLIENT_PORT: u16 = 68;
/// The largest datagram read (an Ethernet MTU's worth).
pub const MAX_PACKET: usize = 1500;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// op … file: the fixed BOOTP header.
const HEADER_LEN: usize = 236;
/// The header and the magic cookie.
const OPTIONS_AT: usize = HEADER_LEN + 4;
/// BOOTP's minimum message size; some relays drop shorter ones.
const MIN_PACKET: usize = 300;
pub(super) const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
const FLAG_BROADCAST: u16 = 0x8000;

/// Option codes used here (RFC 2132).
pub mod opt {
    /// Padding.
    pub const PAD: u8 = 0;
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Routers.
    pub const ROUTER: u8 = 3;
    /// DNS servers.
    pub const DNS: u8 = 6;
    /// Host name.
    pub const HOSTNAME: u8 = 12;
    /// Domain name.
    pub const DOMAIN: u8 = 15;
    /// Interface MTU.
    pub const MTU: u8 = 26;
    /// Requested IP address.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time.
    pub const LEASE_TIME: u8 = 51;
    /// Option overload (options in `file` and/or `sname`).
    pub const OVERLOAD: u8 = 52;
    /// DHCP message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Parameter request list.
    pub const PARAMS: u8 = 55;
    /// Renewal (T1) time.
    pub const T1: u8 = 58;
    /// Rebinding (T2) time.
    pub const T2: u8 = 59;
    /// Client identifier.
    pub const CLIENT_ID: u8 = 61;
    /// End of options.
    pub const END: u8 = 255;
}

/// What the client asks for in option 55.
pub const PARAMETER_REQUEST_LIST: [u8; 8] = [
    opt::SUBNET_MASK,
    opt::ROUTER,
    opt::DNS,
    opt::DOMAIN,
    opt::LEASE_TIME,
    opt::T1,
    opt::T2,
    opt::MTU,
];

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// Shorter than the header and magic cookie.
    #[error("packet of {0} bytes is too short")]
    Truncated(usize),
    /// Not the BOOTP op expected, or not Ethernet.
    #[error("not a DHCP message of the expected kind")]
    WrongKind,
    /// No magic cookie after the header.
    #[error("no DHCP magic cookie")]
    NoCookie,
    /// An option's length runs past its area.
    #[error("option {0} runs past the end of the packet")]
    Overrun(u8),
    /// The options have no end mark.
    #[error("options without an end mark")]
    NoEnd,
    /// An option has a length its type does not allow.
    #[error("option {code} has a bad length {len}")]
    BadLength {
        /// The option.
        code: u8,
        /// Its length.
        len: usize,
    },
    /// A required option is absent.
    #[error("option {0} missing")]
    Missing(u8),
    /// Option 53 holds no known message type.
    #[error("unknown DHCP message type {0}")]
    BadMessageType(u8),
    /// An ACK without a usable address.
    #[error("ACK without an address")]
    NoAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// Client looks for servers.
    Discover = 1,
    /// Server offers an address.
    Offer = 2,
    /// Client asks for (or renews) an address.
    Request = 3,
    /// Client found the address in use.
    Decline = 4,
    /// Server grants the lease.
    Ack = 5,
    /// Server refuses.
    Nak = 6,
    /// Client gives the address back.
    Release = 7,
    /// Client asks for parameters only.
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Result<Self, PacketError> {
        use MessageType::*;
        Ok(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return Err(PacketError::BadMessageType(v)),
        })
    }
}

/// A decoded DHCP message: the header fields a client needs and the
/// options (repeated options concatenated, RFC 3396).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// BOOTREQUEST (1) or BOOTREPLY (2).
    pub op: u8,
    /// Transaction id.
    pub xid: u32,
    /// Flags (bit 15: broadcast).
    pub flags: u16,
    /// Client's address (renewing).
    pub ciaddr: Ipv4Addr,
    /// The address offered or granted.
    pub yiaddr: Ipv4Addr,
    /// Client hardware address.
    pub chaddr: [u8; 6],
    /// Message type (option 53).
    pub kind: MessageType,
    /// All options by code.
    pub options: BTreeMap<u8, Vec<u8>>,
}

impl Packet {
    /// Option `code` as one address (exactly 4 bytes).
    pub fn addr(&self, code: u8) -> Result<Option<Ipv4Addr>, PacketError> {
        self.fixed::<4>(code).map(|o| o.map(Ipv4Addr::from))
    }

    /// Option `code` as a list of addresses (a non-empty multiple of 4).
    pub fn addrs(&self, code: u8) -> Result<Vec<Ipv4Addr>, PacketError> {
        let Some(v) = self.options.get(&code) else {
            return Ok(Vec::new());
        };
        if v.is_empty() || v.len() % 4 != 0 {
            return Err(PacketError::BadLength { code, len: v.len() });
        }
        Ok(v.chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect())
    }

    /// Option `code` as a big-endian u32.
    pub fn u32(&self, code: u8) -> Result<Option<u32>, PacketError> {
        self.fixed::<4>(code).map(|o| o.map(u32::from_be_bytes))
    }

    fn fixed<const N: usize>(&self, code: u8) -> Result<Option<[u8; N]>, PacketError> {
        match self.options.get(&code) {
            None => Ok(None),
            Some(v) => v
                .as_slice()
                .try_into()
                .map(Some)
                .map_err(|_| PacketError::BadLength { code, len: v.len() }),
        }
    }
}

/// A granted lease: what the interface is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// When it was asked for (T1, T2 and the expiry count from here).
    pub obtained: Instant,
    /// The address.
    pub address: Ipv4Addr,
    /// Its netmask (option 1; the classful mask if absent).
    pub netmask: Ipv4Addr,
    /// The server that granted it (option 54).
    pub server: Ipv4Addr,
    /// The first router (option 3).
    pub router: Option<Ipv4Addr>,
    /// Name servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15), when it is a plain DNS name.
    pub domain: Option<String>,
    /// Interface MTU (option 26), when at least 68.
    pub mtu: Option<u16>,
    /// Lease time in seconds (`u32::MAX`: infinite).
    pub secs: u32,
    /// Renewal time (T1) in seconds.
    pub t1: u32,
    /// Rebinding time (T2) in seconds.
    pub t2: u32,
}

impl Lease {
    /// The lease an ACK grants.
    pub fn from_ack(p: &Packet, obtained: Instant) -> Result<Self, PacketError> {
        if p.yiaddr.is_unspecified() || p.yiaddr.is_broadcast() {
            return Err(PacketError::NoAddress);
        }
        let server = p
            .addr(opt::SERVER_ID)?
            .ok_or(PacketError::Missing(opt::SERVER_ID))?;
        let secs = p
            .u32(opt::LEASE_TIME)?
            .ok_or(PacketError::Missing(opt::LEASE_TIME))?;
        let netmask = match p.addr(opt::SUBNET_MASK)? {
            Some(m) => m,
            None => classful_mask(p.yiaddr),
        };
        let t2 = p.u32(opt::T2)?.unwrap_or(secs / 8 * 7).min(secs);
        let t1 = p.u32(opt::T1)?.unwrap_or(secs / 2).min(t2);
        let mtu = match p.options.get(&opt::MTU) {
            None => None,
            Some(v) => match <[u8; 2]>::try_from(v.as_slice()) {
                Ok(b) => Some(u16::from_be_bytes(b)).filter(|m| *m >= 68),
                Err(_) => {
                    return Err(PacketError::BadLength {
                        code: opt::MTU,
                        len: v.len(),
                    })
                }
            },
        };
        let domain = p
            .options
            .get(&opt::DOMAIN)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim_end_matches('\0'))
            .filter(|s| is_dns_name(s))
            .map(str::to_string);
        Ok(Lease {
            obtained,
            address: p.yiaddr,
            netmask,
            server,
            router: p.addrs(opt::ROUTER)?.first().copied(),
            dns: p.addrs(opt::DNS)?,
            domain,
            mtu,
            secs,
            t1,
            t2,
        })
    }

    /// The prefix length of the netmask.
    pub fn prefix_len(&self) -> u32 {
        u32::from(self.netmask).leading_ones()
    }

    /// When `secs` after `obtained` is (T1, T2, the expiry).
    pub fn at(&self, secs: u32) -> Instant {
        self.obtained + Duration::from_secs(secs.into())
    }

    /// Whether the lease never expires.
    pub fn infinite(&self) -> bool {
        self.secs == u32::MAX
    }
}

fn classful_mask(a: Ipv4Addr) -> Ipv4Addr {
    match a.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

/// Whether `s` is a DNS name safe to write into resolv.conf.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// What the client says about itself in every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The interface's MAC address (chaddr; option 61 is type 1 + it).
    pub mac: [u8; 6],
    /// Host name for option 12 (dnsmasq puts it in its DNS).
    pub hostname: Option<String>,
}

/// The BOOTP header fields a message sets.
struct Header {
    op: u8,
    xid: u32,
    flags: u16,
    ciaddr: Ipv4Addr,
    yiaddr: Ipv4Addr,
    chaddr: [u8; 6],
}

/// Encodes a message; options longer than 255 bytes are cut.
fn encode(h: &Header, kind: MessageType, options: &[(u8, &[u8])]) -> Vec<u8> {
    let mut p = vec![0u8; HEADER_LEN];
    p[0] = h.op;
    p[1] = HTYPE_ETHER;
    p[2] = 6;
    p[4..8].copy_from_slice(&h.xid.to_be_bytes());
    p[10..12].copy_from_slice(&h.flags.to_be_bytes());
    p[12..16].copy_from_slice(&h.ciaddr.octets());
    p[16..20].copy_from_slice(&h.yiaddr.octets());
    p[28..34].copy_from_slice(&h.chaddr);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[opt::MESSAGE_TYPE, 1, kind as u8]);
    for (code, data) in options {
        let data = &data[..data.len().min(255)];
        p.push(*code);
        p.push(data.len() as u8);
        p.extend_from_slice(data);
    }
    p.push(opt::END);
    if p.len() < MIN_PACKET {
        p.resize(MIN_PACKET, opt::PAD);
    }
    p
}

fn client_message(
    id: &Identity,
    xid: u32,
    kind: MessageType,
    ciaddr: Ipv4Addr,
    extra: &[(u8, &[u8])],
) -> Vec<u8> {
    let mut client_id = vec![HTYPE_ETHER];
    client_id.extend_from_slice(&id.mac);
    let mut options: Vec<(u8, &[u8])> = vec![(opt::CLIENT_ID, &client_id)];
    if let Some(h) = id.hostname.as_deref().filter(|h| !h.is_empty()) {
        options.push((opt::HOSTNAME, h.as_bytes()));
    }
    options.push((opt::PARAMS, &PARAMETER_REQUEST_LIST));
    options.extend_from_slice(extra);
    let header = Header {
        op: BOOTREQUEST,
        xid,
        // Without an address the client cannot take unicast replies.
        flags: if ciaddr.is_unspecified() {
            FLAG_BROADCAST
        } else {
            0
        },
        ciaddr,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        chaddr: id.mac,
    };
    encode(&header, kind, &options)
}

/// A DHCPDISCOVER, asking for `hint` (a previous address) if given.
pub fn discover(id: &Identity, xid: u32, hint: Option<Ipv4Addr>) -> Vec<u8> {
    let hint = hint.map(|a| a.octets());
    let extra: Vec<(u8, &[u8])> = hint.iter().map(|a| (opt::REQUESTED_IP, &a[..])).collect();
    client_message(
        id,
        xid,
        MessageType::Discover,
        Ipv4Addr::UNSPECIFIED,
        &extra,
    )
}

/// A DHCPREQUEST answering `server`'s offer of `address` (SELECTING).
pub fn request_offer(id: &Identity, xid: u32, address: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
    let (a, s) = (address.octets(), server.octets());
    let extra: [(u8, &[u8]); 2] = [(opt::REQUESTED_IP, &a), (opt::SERVER_ID, &s)];
    client_message(id, xid, MessageType::Request, Ipv4Addr::UNSPECIFIED, &extra)
}

/// A DHCPREQUEST extending the lease on `address` (RENEWING/REBINDING).
pub fn request_renew(id: &Identity, xid: u32, address: Ipv4Addr) -> Vec<u8> {
    client_message(id, xid, MessageType::Request, address, &[])
}

/// Decodes a server's reply.
pub fn parse_reply(buf: &[u8]) -> Result<Packet, PacketError> {
    decode(buf, BOOTREPLY)
}

pub(super) fn decode(buf: &[u8], op: u8) -> Result<Packet, PacketError> {
    if buf.len() < OPTIONS_AT {
        return Err(PacketError::Truncated(buf.len()));
    }
    if buf[0] != op || buf[1] != HTYPE_ETHER || buf[2] != 6 {
        return Err(PacketError::WrongKind);
    }
    if buf[HEADER_LEN..OPTIONS_AT] != MAGIC {
        return Err(PacketError::NoCookie);
    }
    let mut options = BTreeMap::new();
    parse_options(&buf[OPTIONS_AT..], &mut options)?;
    // Option overload: more options in `file` (1), `sname` (2) or both.
    if let Some(v) = options.get(&opt::OVERLOAD).cloned() {
        let &[which] = v.as_slice() else {
            return Err(PacketError::BadLength {
                code: opt::OVERLOAD,
                len: v.len(),
            });
        };
        if which & 1 != 0 {
            parse_options(&buf[108..236], &mut options)?;
        }
        if which & 2 != 0 {
            parse_options(&buf[44..108], &mut options)?;
        }
    }
    let kind = match options.get(&opt::MESSAGE_TYPE).map(Vec::as_slice) {
        Some(&[t]) => MessageType::from_u8(t)?,
        Some(v) => {
            return Err(PacketError::BadLength {
                code: opt::MESSAGE_TYPE,
                len: v.len(),
            })
        }
        None => return Err(PacketError::Missing(opt::MESSAGE_TYPE)),
    };
    let ip = |at: usize| Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&buf[28..34]);
    Ok(Packet {
        op,
        xid: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
        flags: u16::from_be_bytes([buf[10], buf[11]]),
        ciaddr: ip(12),
        yiaddr: ip(16),
        chaddr,
        kind,
        options,
    })
}

/// Reads code/length/value options up to the end mark into `into`.
fn parse_options(area: &[u8], into: &mut BTreeMap<u8, Vec<u8>>) -> Result<(), PacketError> {
    let mut i = 0;
    loop {
        match area.get(i) {
            None => return Err(PacketError::NoEnd),
            Some(&opt::PAD) => i += 1,
            Some(&opt::END) => return Ok(()),
            Some(&code) => {
                let len = *area.get(i + 1).ok_or(PacketError::Overrun(code))? as usize;
                let data = area
                    .get(i + 2..i + 2 + len)
                    .ok_or(PacketError::Overrun(code))?;
                into.entry(code).or_default().extend_from_slice(data);
                i += 2 + len;
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    pub(crate) const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    pub(crate) const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 42);

    pub(crate) fn id() -> Identity {
        Identity {
            mac: MAC,
            hostname: Some("web".into()),
        }
    }

    /// A server's message built by hand: header fields, then raw option
    /// bytes after the cookie (the caller writes pads and the end).
    pub(crate) fn crafted(xid: u32, chaddr: [u8; 6], yiaddr: Ipv4Addr, options: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p[..3].copy_from_slice(&[2, 1, 6]);
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&yiaddr.octets());
        p[28..34].copy_from_slice(&chaddr);
        p.extend_from_slice(&[99, 130, 83, 99]);
        p.extend_from_slice(options);
        p
    }

    pub(crate) fn reply(kind: u8, xid: u32, chaddr: [u8; 6], server: Ipv4Addr) -> Vec<u8> {
        let s = server.octets();
        #[rustfmt::skip]
        let options = [
            53, 1, kind,
            54, 4, s[0], s[1], s[2], s[3],
            1, 4, 255, 255, 255, 0,
            3, 4, 10, 0, 0, 1,
            6, 8, 10, 0, 0, 1, 1, 1, 1, 1,
            15, 10, b's', b'k', b'i', b'f', b'f', b'.', b't', b'e', b's', b't',
            51, 4, 0, 0, 0x0e, 0x10,
            26, 2, 0x05, 0x78,
            0, 0, 255,
        ];
        crafted(xid, chaddr, ADDR, &options)
    }

    #[test]
    fn discover_bytes() {
        let p = discover(&id(), 0xdead_beef, None);
        assert_eq!(p.len(), 300);
        assert_eq!(&p[..4], &[1, 1, 6, 0]);
        assert_eq!(&p[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&p[10..12], &[0x80, 0], "broadcast flag");
        assert!(p[12..28].iter().all(|b| *b == 0), "no addresses");
        assert_eq!(&p[28..34], &MAC);
        assert!(
            p[34..236].iter().all(|b| *b == 0),
            "chaddr padding, sname, file"
        );
        assert_eq!(&p[236..240], &[99, 130, 83, 99], "magic cookie");
        #[rustfmt::skip]
        let want = [
            53, 1, 1,
            61, 7, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56,
            12, 3, b'w', b'e', b'b',
            55, 8, 1, 3, 6, 15, 51, 58, 59, 26,
            255,
        ];
        assert_eq!(&p[240..240 + want.len()], &want);
        assert!(p[240 + want.len()..].iter().all(|b| *b == 0), "padded");
    }

    #[test]
    fn requests_carry_the_right_options() {
        let d = decode(&discover(&id(), 7, Some(ADDR)), BOOTREQUEST).unwrap();
        assert_eq!(d.kind, MessageType::Discover);
        assert_eq!(d.addr(opt::REQUESTED_IP).unwrap(), Some(ADDR));
        let anon = Identity {
            hostname: None,
            ..id()
        };
        let d = decode(&discover(&anon, 7, None), BOOTREQUEST).unwrap();
        assert!(!d.options.contains_key(&opt::HOSTNAME));
        assert!(!d.options.contains_key(&opt::REQUESTED_IP));

        let r = decode(&request_offer(&id(), 8, ADDR, SERVER), BOOTREQUEST).unwrap();
        assert_eq!((r.kind, r.xid, r.flags), (MessageType::Request, 8, 0x8000));
        assert_eq!(r.addr(opt::REQUESTED_IP).unwrap(), Some(ADDR));
        assert_eq!(r.addr(opt::SERVER_ID).unwrap(), Some(SERVER));
        assert_eq!(
            r.options[&opt::CLIENT_ID],
            [1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert_eq!(r.options[&opt::HOSTNAME], b"web");

        let r = decode(&request_renew(&id(), 9, ADDR), BOOTREQUEST).unwrap();
        assert_eq!((r.ciaddr, r.flags), (ADDR, 0), "renewing: ciaddr, unicast");
        assert!(!r.options.contains_key(&opt::REQUESTED_IP));
        assert!(!r.options.contains_key(&opt::SERVER_ID));
    }

    #[test]
    fn parses_an_ack_into_a_lease() {
        let p = parse_reply(&reply(5, 3, MAC, SERVER)).unwrap();
        assert_eq!(
            (p.kind, p.xid, p.chaddr, p.yiaddr),
            (MessageType::Ack, 3, MAC, ADDR)
        );
        let l = Lease::from_ack(&p, Instant::now()).unwrap();
        assert_eq!(l.address, ADDR);
        assert_eq!(l.prefix_len(), 24);
        assert_eq!(l.server, SERVER);
        assert_eq!(l.router, Some(SERVER));
        assert_eq!(l.dns, [SERVER, Ipv4Addr::new(1, 1, 1, 1)]);
        assert_eq!(l.domain.as_deref(), Some("skiff.test"));
        assert_eq!(l.mtu, Some(1400));
        assert_eq!((l.secs, l.t1, l.t2), (3600, 1800, 3150), "T1/T2 defaults");
        assert!(!l.infinite());
    }

    #[test]
    fn lease_options_are_checked() {
        let ack = |extra: &[u8]| {
            let mut o = vec![53, 1, 5, 54, 4, 10, 0, 0, 1, 51, 4, 0, 0, 0, 100];
            o.extend_from_slice(extra);
            o.push(255);
            Lease::from_ack(
                &parse_reply(&crafted(1, MAC, ADDR, &o)).unwrap(),
                Instant::now(),
            )
        };
        let l = ack(&[58, 4, 0, 0, 0, 10, 59, 4, 0, 0, 0, 200]).unwrap();
        assert_eq!(
            (l.t1, l.t2, l.netmask),
            (10, 100, Ipv4Addr::new(255, 0, 0, 0))
        );
        // A domain that would inject resolv.conf lines is dropped.
        assert_eq!(
            ack(&[15, 6, b'a', b'\n', b'n', b's', b' ', b'x'])
                .unwrap()
                .domain,
            None
        );
        assert_eq!(ack(&[26, 2, 0, 10]).unwrap().mtu, None, "MTU below 68");
        assert!(matches!(
            ack(&[26, 1, 5]),
            Err(PacketError::BadLength { code: 26, .. })
        ));
        assert!(matches!(
            ack(&[1, 3, 255, 255, 0]),
            Err(PacketError::BadLength { code: 1, .. })
        ));
        assert!(matches!(
            ack(&[6, 5, 1, 1, 1, 1, 1]),
            Err(PacketError::BadLength { code: 6, .. })
        ));
        let no_time = [53, 1, 5, 54, 4, 10, 0, 0, 1, 255];
        let p = parse_reply(&crafted(1, MAC, ADDR, &no_time)).unwrap();
        assert!(matches!(
            Lease::from_ack(&p, Instant::now()),
            Err(PacketError::Missing(51))
        ));
        let p = parse_reply(&crafted(1, MAC, Ipv4Addr::UNSPECIFIED, &no_time)).unwrap();
        assert!(matches!(
            Lease::from_ack(&p, Instant::now()),
            Err(PacketError::NoAddress)
        ));
    }

    #[test]
    fn malformed_packets_are_errors() {
        let good = reply(2, 1, MAC, SERVER);
        assert!(matches!(
            parse_reply(&good[..239]),
            Err(PacketError::Truncated(239))
        ));
        assert!(matches!(parse_reply(&[]), Err(PacketError::Truncated(0))));
        let mut p = good.clone();
        p[237] = 0;
        assert!(matches!(parse_reply(&p), Err(PacketError::NoCookie)));
        let mut p = good.clone();
        p[0] = 1;
        assert!(matches!(parse_reply(&p), Err(PacketError::WrongKind)));
        type Check = fn(&PacketError) -> bool;
        let cases: [(&[u8], Check); 7] = [
            (&[53, 1, 2], |e| matches!(e, PacketError::NoEnd)),
            (&[53, 1, 2, 0, 0], |e| matches!(e, PacketError::NoEnd)),
            (&[53, 1, 2, 12, 200, 1, 2, 255], |e| {
                matches!(e, PacketError::Overrun(12))
            }),
            (&[53, 1, 2, 12], |e| matches!(e, PacketError::Overrun(12))),
            (&[1, 4, 255, 255, 255, 0, 255], |e| {
                matches!(e, PacketError::Missing(53))
            }),
            (&[53, 2, 2, 2, 255], |e| {
                matches!(e, PacketError::BadLength { code: 53, .. })
            }),
            (&[53, 1, 99, 255], |e| {
                matches!(e, PacketError::BadMessageType(99))
            }),
        ];
        for (options, is) in cases {
            let e = parse_reply(&crafted(1, MAC, ADDR, options)).unwrap_err();
            assert!(is(&e), "{options:?}: {e:?}");
        }
        // Every truncation and many corruptions: errors or packets, no panic.
        for n in 0..good.len() {
            let _ = parse_reply(&good[..n]);
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut p = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = 240 + x as usize % (p.len() - 240);
                p[at] = (x >> 24) as u8;
            }
            if let Ok(p) = parse_reply(&p) {
                let _ = Lease::from_ack(&p, Instant::now());
            }
        }
    }

    #[test]
    fn pads_end_overload_and_split_options() {
        // Pads before options, garbage after the end mark.
        let p = parse_reply(&crafted(1, MAC, ADDR, &[0, 0, 53, 1, 2, 0, 255, 12, 99])).unwrap();
        assert_eq!(p.kind, MessageType::Offer);
        assert_eq!(p.options.len(), 1);
        // RFC 3396: a repeated option is one value.
        let o = [53, 1, 5, 6, 4, 1, 1, 1, 1, 6, 4, 8, 8, 8, 8, 255];
        let p = parse_reply(&crafted(1, MAC, ADDR, &o)).unwrap();
        assert_eq!(p.addrs(opt::DNS).unwrap().len(), 2);
        // Overload: the message type lives in `file`.
        let mut b = crafted(1, MAC, ADDR, &[52, 1, 1, 255]);
        b[108..112].copy_from_slice(&[53, 1, 5, 255]);
        assert_eq!(parse_reply(&b).unwrap().kind, MessageType::Ack);
        b[108..112].copy_from_slice(&[53, 1, 5, 0]);
        assert!(matches!(parse_reply(&b), Err(PacketError::NoEnd)));
    }
}
