//! A scripted fake agent for tests: a Unix socket served by a thread that
//! runs a script against one connection, to play a hostile guest.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

use serde_json::Value;
use skiff_agent_proto::frame::{encode_control, encode_data, read_frame};
use skiff_agent_proto::{AgentMessage, Channel, ClientMessage, Frame, Reply, Welcome};

use crate::{AgentClient, Transport};

/// One connection, as the agent sees it.
pub struct Peer {
    stream: UnixStream,
}

impl Peer {
    /// The next message from the client (`None`: closed or a data frame).
    pub fn recv(&mut self) -> Option<ClientMessage> {
        match read_frame::<Value, _>(&mut self.stream) {
            Ok(Some(Frame::Control(v))) => serde_json::from_value(v).ok(),
            _ => None,
        }
    }

    /// Sends a control message.
    pub fn send(&mut self, msg: &AgentMessage) -> io::Result<()> {
        io::Write::write_all(&mut self.stream, &encode_control(msg).expect("encode"))
    }

    /// Sends a data chunk.
    pub fn data(&mut self, id: u64, channel: Channel, bytes: &[u8]) -> io::Result<()> {
        let f = encode_data(id, channel, bytes).expect("encode");
        io::Write::write_all(&mut self.stream, &f)
    }

    /// Sends a reply.
    pub fn reply(&mut self, id: u64, reply: Reply) -> io::Result<()> {
        self.send(&AgentMessage::Reply { id, reply })
    }

    /// Answers the hello with a welcome of `version`.
    pub fn welcome(&mut self, version: u32) {
        assert!(matches!(self.recv(), Some(ClientMessage::Hello(_))));
        let w = Welcome {
            version,
            agent: "fake".into(),
            pid1: false,
        };
        self.send(&AgentMessage::Welcome(w)).expect("welcome");
    }

    /// Does the handshake with `version`, then returns the first request's
    /// id.
    pub fn welcome_then_request(&mut self, version: u32) -> u64 {
        self.welcome(version);
        match self.recv() {
            Some(ClientMessage::Request { id, .. }) => id,
            other => panic!("expected a request, got {other:?}"),
        }
    }
}

/// A fake agent serving one connection with `script`; the script's result
/// comes back from [`FakeAgent::join`].
pub struct FakeAgent<T> {
    _dir: tempfile::TempDir,
    path: PathBuf,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> FakeAgent<T> {
    /// Listens and runs `script` on the first connection.
    pub fn start(script: impl FnOnce(Peer) -> T + Send + 'static) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            script(Peer { stream })
        });
        FakeAgent {
            _dir: dir,
            path,
            thread: Some(thread),
        }
    }

    /// A client of it.
    pub fn client(&self) -> AgentClient {
        AgentClient::new(Transport::Unix(self.path.clone()))
    }

    /// Waits for the script to end (on a blocking thread: the runtime
    /// must go on, e.g. to drop the connections of aborted tasks).
    pub async fn join(mut self) -> T {
        let thread = self.thread.take().expect("joined once");
        tokio::task::spawn_blocking(move || thread.join().expect("script panicked"))
            .await
            .expect("join task")
    }
}
