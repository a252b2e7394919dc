//! File push and pull: file trees streamed as entries and data chunks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use skiff_agent_proto::frame::read_frame;
use skiff_agent_proto::tree::{self, TreeError, TreeWriter, WriteOptions};
use skiff_agent_proto::{
    AgentMessage, Channel, ClientMessage, EntryKind, ErrorCode, ErrorReply, FileEntry, Frame,
    PullRequest, PushRequest, Reply, MAX_DATA_CHUNK,
};

use crate::sink::{code_of, Sink};

fn tree_error(e: &TreeError) -> ErrorReply {
    let code = match e {
        TreeError::Io { source, .. } => code_of(source),
        TreeError::UnsafePath(_)
        | TreeError::ThroughSymlink(_)
        | TreeError::RootTwice
        | TreeError::OutOfOrder(_)
        | TreeError::ReplacesDirectory(_)
        | TreeError::TooManyEntries(_)
        | TreeError::TooDeep(_)
        | TreeError::SizeMismatch { .. }
        | TreeError::TreeTooLarge(_) => ErrorCode::BadRequest,
        TreeError::Changed(_) => ErrorCode::Io,
        TreeError::Unsupported(_) | TreeError::NotUtf8(_) => ErrorCode::Unsupported,
    };
    ErrorReply {
        code,
        message: error_chain(e),
    }
}

/// Formats an error with its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves a push: reads entries and data from `reader` until
/// `end_of_entries`, then replies. After the first error the rest of the
/// stream is read and dropped, so the connection stays in step. Returns
/// false if the connection broke.
pub fn push<R: Read>(reader: &mut R, sink: &Sink, id: u64, req: &PushRequest) -> bool {
    let mut failure: Option<ErrorReply> = None;
    if !req.path.starts_with('/') {
        failure = Some(ErrorReply {
            code: ErrorCode::BadRequest,
            message: "push path must be absolute".into(),
        });
    }
    // The host is trusted here: its modes are kept whole (set-id bits
    // included) and its trees are not capped.
    let opts = WriteOptions {
        parents: req.parents,
        owners: true,
        special_bits: true,
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
    };
    let mut writer = TreeWriter::new(Path::new(&req.path), opts);
    let mut current: Option<(FileEntry, Option<File>, u64)> = None;
    loop {
        let frame = match read_frame::<ClientMessage, _>(reader) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return false,
        };
        match frame {
            Frame::Control(ClientMessage::Entry { id: eid, entry }) if eid == id => {
                if current.is_some() && failure.is_none() {
                    failure = Some(bad("entry before the end of the previous file"));
                }
                if failure.is_some() {
                    current =
                        matches!(entry.kind, EntryKind::File { .. }).then_some((entry, None, 0));
                    continue;
                }
                match writer.begin(&entry) {
                    Ok(Some(f)) => current = Some((entry, Some(f), 0)),
                    Ok(None) => {
                        if let Err(e) = writer.end(&entry) {
                            failure = Some(tree_error(&e));
                        }
                    }
                    Err(e) => {
                        failure = Some(tree_error(&e));
                        current = matches!(entry.kind, EntryKind::File { .. })
                            .then_some((entry, None, 0));
                    }
                }
            }
            Frame::Data(d) if d.id == id && d.channel == Channel::File => {
                let Some((entry, file, written)) = current.as_mut() else {
                    failure.get_or_insert_with(|| bad("file data outside a file"));
                    continue;
                };
                if d.bytes.is_empty() {
                    let (entry, file, written) = current.take().expect("checked above");
                    if failure.is_none() && file.is_some() {
                        failure = end_file(&mut writer, &entry, written);
                    }
                    continue;
                }
                if let (Some(f), None) = (file.as_mut(), &failure) {
                    *written += d.bytes.len() as u64;
                    if let Err(e) = f.write_all(&d.bytes) {
                        failure = Some(ErrorReply {
                            code: code_of(&e),
                            message: format!("{}: {e}", entry.path),
                        });
                    }
                }
            }
            Frame::Control(ClientMessage::EndOfEntries { id: eid }) if eid == id => break,
            _ => {
                failure.get_or_insert_with(|| bad("unexpected message in a push"));
            }
        }
    }
    if current.is_some() {
        failure.get_or_insert_with(|| bad("stream ended inside a file"));
    }
    let reply = match failure {
        Some(f) => Reply::Error(f),
        None => match writer.finish() {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Error(tree_error(&e)),
        },
    };
    sink.reply(id, reply).is_ok()
}

fn end_file(writer: &mut TreeWriter, entry: &FileEntry, written: u64) -> Option<ErrorReply> {
    if let EntryKind::File { size } = entry.kind {
        if size != written {
            return Some(bad(&format!(
                "{}: announced {size} bytes, got {written}",
                entry.path
            )));
        }
    }
    writer.end(entry).err().map(|e| tree_error(&e))
}

fn bad(message: &str) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

/// Serves a pull: entries and file data, then `ok` (or an error reply at
/// the point of failure). Returns false if the connection broke.
pub fn pull(sink: &Sink, id: u64, req: &PullRequest) -> bool {
    let entries = match tree::list(Path::new(&req.path)) {
        Ok(e) => e,
        Err(e) => return sink.reply(id, Reply::Error(tree_error(&e))).is_ok(),
    };
    for (local, entry) in entries {
        let is_file = matches!(entry.kind, EntryKind::File { .. });
        // Open before announcing, so a failure needs no half-sent file.
        let file = if is_file {
            match File::open(&local) {
                Ok(f) => Some(f),
                Err(e) => {
                    let msg = format!("{}: {e}", local.display());
                    return sink.error(id, code_of(&e), msg).is_ok();
                }
            }
        } else {
            None
        };
        if sink.send(&AgentMessage::Entry { id, entry }).is_err() {
            return false;
        }
        if let Some(f) = file {
            let res = send_file(sink, id, f);
            if sink.data(id, Channel::File, &[]).is_err() {
                return false;
            }
            if let Err(e) = res {
                let msg = format!("{}: {e}", local.display());
                return sink.error(id, code_of(&e), msg).is_ok();
            }
        }
    }
    sink.reply(id, Reply::Ok).is_ok()
}

fn send_file(sink: &Sink, id: u64, mut f: File) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        sink.data(id, Channel::File, &buf[..n])?;
    }
}
