//! Push and pull of files and directory trees, streamed in chunks.

use std::path::Path;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use skiff_agent_proto::tree::{self, TreeError, TreeReceiver, WriteOptions};
use skiff_agent_proto::{
    AgentMessage, Channel, ClientMessage, EntryKind, FileEntry, Frame, PullRequest, PushRequest,
    Reply, Request, MAX_DATA_CHUNK,
};

use crate::conn::Connection;
use crate::{agent_error, describe, describe_reply, ClientError};

/// How a push sets owners and modes in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// Owner of every pushed entry (default: the agent's user, root).
    pub uid: Option<u32>,
    /// Group of every pushed entry.
    pub gid: Option<u32>,
    /// Mode of the top entry (default: the local file's).
    pub mode: Option<u32>,
    /// Create missing parent directories in the guest.
    pub parents: bool,
}

/// How a pull writes locally.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullOptions {
    /// Apply the guest's uid/gid (needs privileges on the host).
    pub owners: bool,
}

/// Sends the tree at `local` to `remote` in the guest.
pub(crate) async fn push(
    conn: &mut Connection,
    local: &Path,
    remote: &str,
    opts: &PushOptions,
) -> Result<(), ClientError> {
    let local_path = local.to_path_buf();
    let mut entries = tokio::task::spawn_blocking(move || tree::list(&local_path))
        .await
        .map_err(|e| ClientError::Protocol(format!("listing task: {e}")))??;
    for (_, e) in entries.iter_mut() {
        e.uid = opts.uid;
        e.gid = opts.gid;
    }
    if let (Some(mode), Some((_, root))) = (opts.mode, entries.first_mut()) {
        root.mode = mode & 0o7777;
    }
    let id = conn.new_id();
    let request = Request::Push(PushRequest {
        path: remote.to_string(),
        parents: opts.parents,
    });
    conn.send(&ClientMessage::Request { id, request }).await?;
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    for (path, entry) in entries {
        let is_file = matches!(entry.kind, EntryKind::File { .. });
        conn.send(&ClientMessage::Entry { id, entry }).await?;
        if is_file {
            let mut f = tokio::fs::File::open(&path)
                .await
                .map_err(|e| ClientError::Local(path.clone(), e))?;
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| ClientError::Local(path.clone(), e))?;
                if n == 0 {
                    break;
                }
                conn.send_data(id, Channel::File, &buf[..n]).await?;
            }
            conn.send_data(id, Channel::File, &[]).await?;
        }
    }
    conn.send(&ClientMessage::EndOfEntries { id }).await?;
    match conn.reply(id, Some(conn.timeouts.request)).await? {
        Reply::Ok => Ok(()),
        other => Err(ClientError::Protocol(format!(
            "unexpected reply to push: {}",
            describe_reply(&other)
        ))),
    }
}

/// What the pull's network side hands the tree writer.
enum Item {
    Entry(FileEntry),
    Data(Vec<u8>),
    /// The agent said the tree is complete.
    Done,
}

/// Applies the received tree (blocking file I/O, on a thread of its own):
/// whether the agent completed it, or the pull was abandoned.
fn write_tree(
    local: &Path,
    opts: WriteOptions,
    mut rx: mpsc::Receiver<Item>,
) -> Result<bool, TreeError> {
    let mut receiver = TreeReceiver::new(local, opts);
    while let Some(item) = rx.blocking_recv() {
        match item {
            Item::Entry(e) => receiver.entry(e)?,
            Item::Data(b) => receiver.data(&b)?,
            Item::Done => {
                receiver.finish()?;
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Receives the tree at `remote` in the guest into `local`. The guest is
/// not trusted: the tree is written through a [`TreeReceiver`] (no symlink
/// followed below `local`, sizes enforced as bytes arrive, set-id and
/// sticky bits cleared, entries and bytes capped by [`crate::Limits`]).
pub(crate) async fn pull(
    conn: &mut Connection,
    remote: &str,
    local: &Path,
    opts: &PullOptions,
) -> Result<(), ClientError> {
    let id = conn.new_id();
    let request = Request::Pull(PullRequest {
        path: remote.to_string(),
    });
    conn.send(&ClientMessage::Request { id, request }).await?;
    let write_opts = WriteOptions {
        parents: true,
        owners: opts.owners,
        special_bits: false,
        max_entries: conn.limits.pull_entries,
        max_bytes: conn.limits.pull_bytes,
    };
    let (tx, rx) = mpsc::channel(4);
    let root = local.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_tree(&root, write_opts, rx));
    let limit = conn.timeouts.request;
    let received = async {
        loop {
            let item = match conn.recv_within(limit, "pulling").await? {
                Frame::Control(AgentMessage::Entry { id: eid, entry }) if eid == id => {
                    Item::Entry(entry)
                }
                Frame::Data(d) if d.id == id && d.channel == Channel::File => Item::Data(d.bytes),
                Frame::Control(AgentMessage::Reply {
                    reply: Reply::Error(e),
                    ..
                }) => return Err(agent_error(e)),
                Frame::Control(AgentMessage::Reply {
                    id: rid,
                    reply: Reply::Ok,
                }) if rid == id => Item::Done,
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected frame in pull: {}",
                        describe(&other)
                    )))
                }
            };
            let done = matches!(item, Item::Done);
            // A closed channel: the writer stopped at an error, below.
            if tx.send(item).await.is_err() || done {
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ClientError::Protocol(format!("tree writer task: {e}")))?;
    // The writer's error explains why the stream stopped being read.
    match (written, received) {
        (Err(e), _) => Err(e.into()),
        (Ok(_), Err(e)) => Err(e),
        (Ok(true), Ok(())) => Ok(()),
        (Ok(false), Ok(())) => Err(ClientError::Protocol("pull ended before the tree".into())),
    }
}
