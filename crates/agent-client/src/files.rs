//! Push and pull of files and directory trees, streamed in chunks.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use skiff_agent_proto::tree::{self, TreeWriter};
use skiff_agent_proto::{
    AgentMessage, Channel, ClientMessage, EntryKind, FileEntry, Frame, PullRequest, PushRequest,
    Reply, Request, MAX_DATA_CHUNK,
};

use crate::conn::Connection;
use crate::ClientError;

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
            "unexpected reply to push: {other:?}"
        ))),
    }
}

/// Receives the tree at `remote` in the guest into `local`.
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
    let mut writer = TreeWriter::new(local, true, opts.owners);
    let mut current: Option<(FileEntry, tokio::fs::File, u64)> = None;
    let limit = conn.timeouts.request;
    loop {
        match conn.recv_within(limit, "pulling").await? {
            Frame::Control(AgentMessage::Entry { id: eid, entry }) if eid == id => {
                if current.is_some() {
                    return Err(ClientError::Protocol("entry inside a file".into()));
                }
                if let Some(f) = writer.begin(&entry)? {
                    current = Some((entry, tokio::fs::File::from_std(f), 0));
                } else {
                    writer.end(&entry)?;
                }
            }
            Frame::Data(d) if d.id == id && d.channel == Channel::File => {
                let Some((entry, f, written)) = current.as_mut() else {
                    return Err(ClientError::Protocol("file data outside a file".into()));
                };
                let name = local.join(&entry.path);
                if d.bytes.is_empty() {
                    f.flush()
                        .await
                        .map_err(|e| ClientError::Local(name.clone(), e))?;
                    let (entry, _f, written) = current.take().expect("checked above");
                    if entry.kind != (EntryKind::File { size: written }) {
                        return Err(ClientError::Protocol(format!(
                            "{}: size mismatch ({written} bytes)",
                            entry.path
                        )));
                    }
                    writer.end(&entry)?;
                } else {
                    *written += d.bytes.len() as u64;
                    f.write_all(&d.bytes)
                        .await
                        .map_err(|e| ClientError::Local(name, e))?;
                }
            }
            Frame::Control(AgentMessage::Reply {
                reply: Reply::Error(e),
                ..
            }) => return Err(ClientError::Agent(e)),
            Frame::Control(AgentMessage::Reply {
                id: rid,
                reply: Reply::Ok,
            }) if rid == id => break,
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame in pull: {other:?}"
                )))
            }
        }
    }
    if current.is_some() {
        return Err(ClientError::Protocol("pull ended inside a file".into()));
    }
    writer.finish()?;
    Ok(())
}
