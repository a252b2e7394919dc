//! The sending half of a connection, shared by the threads that serve it.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Mutex;

use skiff_agent_proto::frame::{encode_control, encode_data};
use skiff_agent_proto::{AgentMessage, Channel, ErrorCode, ErrorReply, Reply};

/// Serialises frames from several threads onto one stream.
#[derive(Debug)]
pub struct Sink {
    stream: Mutex<File>,
}

impl Sink {
    /// Wraps the stream.
    pub fn new(stream: File) -> Self {
        Sink {
            stream: Mutex::new(stream),
        }
    }

    fn write(&self, frame: &[u8]) -> io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(frame)
    }

    /// Sends a control message.
    pub fn send(&self, msg: &AgentMessage) -> io::Result<()> {
        self.write(&encode_control(msg).map_err(io::Error::other)?)
    }

    /// Sends a reply.
    pub fn reply(&self, id: u64, reply: Reply) -> io::Result<()> {
        self.send(&AgentMessage::Reply { id, reply })
    }

    /// Sends an error reply.
    pub fn error(&self, id: u64, code: ErrorCode, message: impl Into<String>) -> io::Result<()> {
        self.reply(
            id,
            Reply::Error(ErrorReply {
                code,
                message: message.into(),
            }),
        )
    }

    /// Sends a data chunk (`bytes` at most `MAX_DATA_CHUNK`).
    pub fn data(&self, id: u64, channel: Channel, bytes: &[u8]) -> io::Result<()> {
        self.write(&encode_data(id, channel, bytes).map_err(io::Error::other)?)
    }
}

/// Maps an I/O error to the protocol's error code.
pub fn code_of(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    }
}
