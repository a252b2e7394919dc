//! Raw images: the file is the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{check_range, DiskError, DiskImage, Format};

/// A raw image file.
pub struct RawImage {
    file: File,
    size: u64,
    readonly: bool,
}

impl RawImage {
    /// Serves `file` (opened and locked by the caller) as a raw disk.
    pub fn new(file: File, path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let size = file
            .metadata()
            .map_err(|source| DiskError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(RawImage {
            file,
            size,
            readonly,
        })
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset).map_err(DiskError::Io)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len(), self.size)?;
        self.file.write_all_at(buf, offset).map_err(DiskError::Io)
    }
    fn flush(&self) -> Result<(), DiskError> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data().map_err(DiskError::Io)
    }
}
