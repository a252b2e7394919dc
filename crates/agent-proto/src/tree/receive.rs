//! [`TreeReceiver`]: a received tree's messages, in the order they come,
//! applied through a [`TreeWriter`].

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::{TreeError, TreeWriter, WriteOptions};
use crate::message::{EntryKind, FileEntry};

/// The regular file whose data is arriving.
#[derive(Debug)]
struct Current {
    entry: FileEntry,
    file: File,
    size: u64,
    written: u64,
}

/// Applies a received tree as it arrives: [`TreeReceiver::entry`] for each
/// entry, [`TreeReceiver::data`] for each chunk of the current regular
/// file (an empty chunk ends it), then [`TreeReceiver::finish`] once the
/// sender said the tree is complete.
///
/// Never trusts the sender: besides what [`TreeWriter`] refuses, a chunk
/// that would take a file beyond its announced size is refused before any
/// of it is written, a file that ends short is refused, and a file whose
/// announced size takes the tree beyond [`WriteOptions::max_bytes`] is
/// refused at its entry.
#[derive(Debug)]
pub struct TreeReceiver {
    writer: TreeWriter,
    current: Option<Current>,
    announced: u64,
    max_bytes: u64,
}

impl TreeReceiver {
    /// A receiver for the tree whose root entry goes to `root`.
    pub fn new(root: &Path, opts: WriteOptions) -> Self {
        TreeReceiver {
            writer: TreeWriter::new(root, opts),
            current: None,
            announced: 0,
            max_bytes: opts.max_bytes,
        }
    }

    /// The next entry.
    pub fn entry(&mut self, entry: FileEntry) -> Result<(), TreeError> {
        if let Some(cur) = &self.current {
            return Err(TreeError::OutOfOrder(format!(
                "entry {:?} inside file {:?}",
                entry.path, cur.entry.path
            )));
        }
        let size = match entry.kind {
            EntryKind::File { size } => size,
            _ => 0,
        };
        match self.announced.checked_add(size) {
            Some(total) if total <= self.max_bytes => self.announced = total,
            _ => return Err(TreeError::TreeTooLarge(self.max_bytes)),
        }
        match self.writer.begin(&entry)? {
            Some(file) => {
                self.current = Some(Current {
                    entry,
                    file,
                    size,
                    written: 0,
                })
            }
            None => self.writer.end(&entry)?,
        }
        Ok(())
    }

    /// A chunk of the current file; empty: its end.
    pub fn data(&mut self, bytes: &[u8]) -> Result<(), TreeError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(TreeError::OutOfOrder("file data outside a file".into()));
        };
        if bytes.is_empty() {
            let cur = self.current.take().expect("checked above");
            if cur.written != cur.size {
                return Err(TreeError::SizeMismatch {
                    path: cur.entry.path,
                    announced: cur.size,
                    sent: cur.written,
                });
            }
            drop(cur.file);
            return self.writer.end(&cur.entry);
        }
        let sent = cur.written.saturating_add(bytes.len() as u64);
        if sent > cur.size {
            return Err(TreeError::SizeMismatch {
                path: cur.entry.path.clone(),
                announced: cur.size,
                sent,
            });
        }
        cur.file.write_all(bytes).map_err(|source| TreeError::Io {
            path: cur.entry.path.clone().into(),
            source,
        })?;
        cur.written = sent;
        Ok(())
    }

    /// The sender said the tree is complete: applies the directories'
    /// modes (see [`TreeWriter::finish`]).
    pub fn finish(self) -> Result<(), TreeError> {
        if let Some(cur) = self.current {
            return Err(TreeError::OutOfOrder(format!(
                "the tree ended inside file {:?}",
                cur.entry.path
            )));
        }
        self.writer.finish()
    }
}
