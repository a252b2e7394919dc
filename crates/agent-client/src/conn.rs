//! One connection to the agent: framing, handshake, request/reply.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use tokio::time::{timeout, timeout_at, Instant};

use skiff_agent_proto::frame::{body_len, decode_body, encode_control, encode_data, HEADER_LEN};
use skiff_agent_proto::{
    AgentMessage, Channel, ClientMessage, Frame, Hello, Reply, Request, Welcome,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::{agent_error, defang_welcome, describe, ClientError, Limits, Timeouts, Transport};

/// The sending half, shared by an exec session and its controls.
pub(crate) type Writer = Arc<Mutex<FrameWriter>>;

/// The sending half and how far the frame being written got: a frame cut
/// off (a time limit, a cancelled task, an I/O error) would make the agent
/// read the next frame's bytes as its rest, so the connection then refuses
/// to send anything more.
pub(crate) struct FrameWriter {
    half: OwnedWriteHalf,
    /// Bytes of an unfinished frame already sent (0: between frames).
    partial: usize,
}

/// A connection that has passed the version handshake. Requests run one
/// at a time on it; see [`crate::AgentClient`] for the operations.
pub struct Connection {
    pub(crate) reader: BufReader<OwnedReadHalf>,
    pub(crate) writer: Writer,
    pub(crate) timeouts: Timeouts,
    pub(crate) limits: Limits,
    pub(crate) welcome: Welcome,
    next_id: u64,
}

impl Connection {
    /// Connects and does the version handshake, all within the connect
    /// timeout.
    pub async fn open(transport: &Transport, timeouts: Timeouts) -> Result<Self, ClientError> {
        let stream = transport.connect(timeouts.connect).await?;
        let (r, w) = stream.into_split();
        let mut conn = Connection {
            reader: BufReader::with_capacity(512 * 1024, r),
            writer: Arc::new(Mutex::new(FrameWriter {
                half: w,
                partial: 0,
            })),
            timeouts,
            limits: Limits::default(),
            welcome: Welcome {
                version: 0,
                agent: String::new(),
                pid1: false,
            },
            next_id: 1,
        };
        let hello = ClientMessage::Hello(Hello::current("skiff-agent-client"));
        conn.send_within(&hello, timeouts.connect, "handshake")
            .await?;
        match conn.recv_within(timeouts.connect, "handshake").await? {
            Frame::Control(AgentMessage::Welcome(w)) => {
                // The agent must pick a version of the hello's range.
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&w.version) {
                    return Err(ClientError::Protocol(format!(
                        "the agent chose protocol version {}, not one of {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                        w.version
                    )));
                }
                conn.welcome = defang_welcome(w);
            }
            Frame::Control(AgentMessage::Reply {
                reply: Reply::Error(e),
                ..
            }) => return Err(agent_error(e)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {}",
                    describe(&other)
                )))
            }
        }
        Ok(conn)
    }

    /// What the agent said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub(crate) fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Reads the next frame, without a time limit.
    pub(crate) async fn recv(&mut self) -> Result<Frame<AgentMessage>, ClientError> {
        let mut header = [0u8; HEADER_LEN];
        match self.reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ClientError::Closed)
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
        let len = body_len(header)?;
        let mut body = vec![0u8; len];
        self.reader
            .read_exact(&mut body)
            .await
            .map_err(ClientError::Io)?;
        Ok(decode_body(&body)?)
    }

    /// Reads the next frame within `limit`.
    pub(crate) async fn recv_within(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Frame<AgentMessage>, ClientError> {
        timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout(what))?
    }

    pub(crate) async fn send_within<M: serde::Serialize>(
        &self,
        msg: &M,
        limit: Duration,
        what: &'static str,
    ) -> Result<(), ClientError> {
        let frame = encode_control(msg)?;
        write_within(&self.writer, &frame, limit, what).await
    }

    pub(crate) async fn send(&self, msg: &ClientMessage) -> Result<(), ClientError> {
        self.send_within(msg, self.timeouts.request, "sending")
            .await
    }

    pub(crate) async fn send_data(
        &self,
        id: u64,
        channel: Channel,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        let frame = encode_data(id, channel, bytes)?;
        write_within(&self.writer, &frame, self.timeouts.request, "sending data").await
    }

    /// Waits for the final reply of request `id`, each frame within
    /// `limit`; anything else in between is a protocol error.
    pub(crate) async fn reply(
        &mut self,
        id: u64,
        limit: Option<Duration>,
    ) -> Result<Reply, ClientError> {
        let frame = match limit {
            Some(l) => self.recv_within(l, "waiting for a reply").await?,
            None => self.recv().await?,
        };
        match frame {
            Frame::Control(AgentMessage::Reply {
                reply: Reply::Error(e),
                ..
            }) => Err(agent_error(e)),
            Frame::Control(AgentMessage::Reply { id: rid, reply }) if rid == id => Ok(reply),
            other => Err(ClientError::Protocol(format!(
                "expected reply to {id}, got {}",
                describe(&other)
            ))),
        }
    }

    /// Sends a request and waits (with the request timeout) for its reply.
    pub async fn request(&mut self, request: Request) -> Result<Reply, ClientError> {
        let id = self.new_id();
        self.send(&ClientMessage::Request { id, request }).await?;
        self.reply(id, Some(self.timeouts.request)).await
    }

    /// Sends any JSON value as the request body (for tests of requests
    /// this client does not know) and waits for the reply.
    pub async fn raw_request(&mut self, request: Value) -> Result<Reply, ClientError> {
        let id = self.new_id();
        let msg = serde_json::json!({"type": "request", "id": id, "request": request});
        self.send_within(&msg, self.timeouts.request, "sending")
            .await?;
        self.reply(id, Some(self.timeouts.request)).await
    }
}

/// Writes one frame within `limit` (waiting for the writer included).
pub(crate) async fn write_within(
    writer: &Writer,
    frame: &[u8],
    limit: Duration,
    what: &'static str,
) -> Result<(), ClientError> {
    let deadline = Instant::now() + limit;
    match timeout_at(deadline, write_frame(writer, frame)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout(what)),
    }
}

/// Writes one frame, waiting as long as the transport holds it back (stdin
/// under back-pressure has no time limit). Cancel-safe in the sense that a
/// frame cut off poisons the connection instead of corrupting it.
pub(crate) async fn write_frame(writer: &Writer, frame: &[u8]) -> Result<(), ClientError> {
    let mut w = writer.lock().await;
    if w.partial != 0 {
        return Err(ClientError::Protocol(
            "an earlier frame was cut off; the connection cannot be used".into(),
        ));
    }
    let mut sent = 0;
    while sent < frame.len() {
        let n = match w.half.write(&frame[sent..]).await {
            Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
            r => r,
        };
        match n {
            Ok(n) => sent += n,
            Err(e) => {
                // Whatever went out, the stream is no longer in step.
                w.partial = w.partial.max(1);
                return Err(ClientError::Io(e));
            }
        }
        w.partial = if sent == frame.len() { 0 } else { sent };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer_pair() -> (Writer, tokio::net::UnixStream) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_r, w) = a.into_split();
        let writer = Arc::new(Mutex::new(FrameWriter {
            half: w,
            partial: 0,
        }));
        (writer, b)
    }

    #[tokio::test]
    async fn a_frame_cut_off_by_its_time_limit_poisons_the_connection() {
        let (writer, _peer) = writer_pair();
        // Nobody reads `peer`: a big frame cannot go out within the limit.
        let big = vec![0u8; 8 << 20];
        let r = write_within(&writer, &big, Duration::from_millis(100), "test").await;
        assert!(matches!(r, Err(ClientError::Timeout("test"))));
        let r = write_within(&writer, b"small", Duration::from_secs(1), "test").await;
        assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
        // Frames that time out before a byte went out leave it usable.
        let (writer, _peer2) = writer_pair();
        let guard = writer.lock().await;
        let r = write_within(&writer, b"x", Duration::from_millis(50), "test").await;
        assert!(matches!(r, Err(ClientError::Timeout("test"))));
        drop(guard);
        write_within(&writer, b"x", Duration::from_secs(1), "test")
            .await
            .unwrap();
    }
}
