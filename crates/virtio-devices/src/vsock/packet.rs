//! The virtio-vsock packet header and moving packets in and out of
//! descriptor chains (virtio 1.x, 5.10.6).

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::GuestMemoryMmap;

/// Size of the packet header.
pub const HDR_SIZE: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type supported.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// The sender will not send and/or receive any more.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// Errors reading a packet from the guest.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain is not in guest memory.
    #[error("descriptor chain")]
    Chain(#[source] virtio_queue::Error),
    /// Fewer readable bytes than a header.
    #[error("packet shorter than its header")]
    ShortHeader,
    /// The header's length exceeds the limit or the chain.
    #[error("packet payload length {0} invalid")]
    BadLength(u32),
    /// Copying from guest memory failed.
    #[error("guest memory access")]
    GuestMemory(#[source] std::io::Error),
    /// The chain cannot hold a header and at least one payload byte.
    #[error("receive buffer too small for a packet with data")]
    ShortBuffer,
}

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

impl Header {
    /// Parses a header.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Serializes the header.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Reads a packet the guest sent (a TX chain): header and payload. The
/// payload is at most [`MAX_PKT_PAYLOAD`] bytes.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Header, Vec<u8>), PacketError> {
    let mut reader = Reader::new(mem, chain).map_err(PacketError::Chain)?;
    if reader.available_bytes() < HDR_SIZE {
        return Err(PacketError::ShortHeader);
    }
    let mut hdr = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut hdr)
        .map_err(PacketError::GuestMemory)?;
    let header = Header::from_bytes(&hdr);
    let len = header.len as usize;
    if len > MAX_PKT_PAYLOAD || len > reader.available_bytes() {
        return Err(PacketError::BadLength(header.len));
    }
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .map_err(PacketError::GuestMemory)?;
    Ok((header, payload))
}

/// A receive chain ready to take one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Wraps an RX chain; fails if it is not in memory, or too short to
    /// carry any data (such a buffer would be taken for each packet, fit
    /// none with data, and hold up the ones behind it).
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let writer = Writer::new(mem, chain).map_err(PacketError::Chain)?;
        if writer.available_bytes() <= HDR_SIZE {
            return Err(PacketError::ShortBuffer);
        }
        Ok(RxBuffer { writer })
    }

    /// Payload bytes the chain can take.
    pub fn payload_capacity(&self) -> usize {
        (self.writer.available_bytes() - HDR_SIZE).min(MAX_PKT_PAYLOAD)
    }

    /// Writes the packet; `header.len` is set from `payload`. Returns the
    /// used length.
    pub fn write(mut self, mut header: Header, payload: &[u8]) -> Result<u32, PacketError> {
        header.len = payload.len() as u32;
        self.writer
            .write_all(&header.to_bytes())
            .map_err(PacketError::GuestMemory)?;
        self.writer
            .write_all(payload)
            .map_err(PacketError::GuestMemory)?;
        Ok((HDR_SIZE + payload.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 77,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[30], op::RW as u8);
    }
}
