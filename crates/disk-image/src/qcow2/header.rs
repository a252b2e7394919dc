//! Our own check of a qcow2 image before imago touches it.
//!
//! Every size and offset the header gives is checked against the file and
//! capped, and every table it points to is walked once: L1 entries must
//! point at L2 tables inside the file, L2 entries at clusters inside the
//! file, refcount table entries at refcount blocks inside the file. Features
//! we do not serve (encryption, external data files, zstd compression,
//! extended L2 entries) and the dirty and corrupt bits are refused by name.
//! A hostile image gets a [`HeaderError`]; the memory this takes is capped
//! (at most [`MAX_L1_BYTES`] for the L1 table, one cluster for an L2 table
//! or refcount block, [`MAX_REFTABLE_BYTES`] for the refcount table).

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Largest L1 table we read (QEMU's limit too).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we read (QEMU's limit too).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Smallest and largest cluster size (as log2), as in QEMU.
pub const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// Longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most internal snapshots (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;

const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;
const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Host offset bits of L1, L2 and refcount table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;

/// Incompatible feature bits, by name.
const INCOMPATIBLE: [(u32, &str); 5] = [
    (
        0,
        "dirty (not closed cleanly; repair it with `qemu-img check -r all`)",
    ),
    (
        1,
        "corrupt (QEMU found inconsistent metadata; repair it with `qemu-img check -r all`)",
    ),
    (2, "external data file"),
    (3, "compression type other than zlib"),
    (4, "extended L2 entries"),
];

/// What is wrong with a qcow2 image.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Reading the file failed.
    #[error("read the image")]
    Io(#[source] std::io::Error),
    /// The file is shorter than a qcow2 header.
    #[error("the file ({0} bytes) is too short for a qcow2 header")]
    TooShort(u64),
    /// No qcow2 magic.
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NoMagic,
    /// A version other than 2 and 3.
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// A header field out of its valid range.
    #[error("header field {field} = {value} is invalid: {why}")]
    Field {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// The image is encrypted.
    #[error("encrypted qcow2 images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// An incompatible feature bit we do not serve.
    #[error("incompatible feature bit {bit} is set: {name}")]
    Incompatible {
        /// Bit number.
        bit: u32,
        /// What it means.
        name: &'static str,
    },
    /// Internal snapshots in an image opened for writing.
    #[error("the image has {0} internal snapshots; it can only be opened read-only")]
    Snapshots(u32),
    /// A header extension runs past the header cluster.
    #[error("header extension {kind:#x} at byte {at} runs past the header cluster")]
    Extension {
        /// Extension type.
        kind: u32,
        /// Its offset.
        at: usize,
    },
    /// The backing file name or format is not UTF-8.
    #[error("the backing file {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A table lies (partly) outside the file.
    #[error("{table} at {offset:#x} ({len} bytes) lies outside the file ({file_len} bytes)")]
    OutsideFile {
        /// Which table or cluster.
        table: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// File length.
        file_len: u64,
    },
    /// A table entry that is not cluster aligned or has reserved bits set.
    #[error("{table} entry {index} ({entry:#018x}) is invalid")]
    Entry {
        /// Which table.
        table: &'static str,
        /// Entry index.
        index: u64,
        /// Raw entry.
        entry: u64,
    },
}

/// What the rest of the crate needs from a checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Backing file name as recorded (relative to the image's directory
    /// unless absolute).
    pub backing_file: Option<String>,
    /// Backing file format from the header extension.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn field(field: &'static str, value: u64, why: &'static str) -> HeaderError {
    HeaderError::Field { field, value, why }
}

/// Reads exactly `buf.len()` bytes at `offset`, which the caller has
/// checked to lie inside the file.
fn read(file: &File, buf: &mut [u8], offset: u64) -> Result<(), HeaderError> {
    file.read_exact_at(buf, offset).map_err(HeaderError::Io)
}

/// `len` bytes at `offset` must lie inside a file of `file_len` bytes.
fn inside(table: &'static str, offset: u64, len: u64, file_len: u64) -> Result<(), HeaderError> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(HeaderError::OutsideFile {
            table,
            offset,
            len,
            file_len,
        }),
    }
}

/// Checks the image in `file` (see the module docs); `writable` refuses
/// what we can only read.
pub fn check(file: &File, writable: bool) -> Result<Header, HeaderError> {
    let file_len = file.metadata().map_err(HeaderError::Io)?.len();
    if file_len < V2_HEADER_LEN as u64 {
        return Err(HeaderError::TooShort(file_len));
    }
    let mut fixed = [0u8; V2_HEADER_LEN];
    read(file, &mut fixed, 0)?;
    if fixed[0..4] != crate::QCOW2_MAGIC {
        return Err(HeaderError::NoMagic);
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Version(version));
    }
    let cluster_bits = be32(&fixed, 20);
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(field(
            "cluster_bits",
            cluster_bits.into(),
            "clusters are 512 B to 2 MiB",
        ));
    }
    let cluster = 1u64 << cluster_bits;
    // The header cluster (or what there is of it).
    let head_len = cluster.min(file_len) as usize;
    let mut head = vec![0u8; head_len];
    read(file, &mut head, 0)?;

    let crypt = be32(&head, 32);
    if crypt != 0 {
        return Err(HeaderError::Encrypted(crypt));
    }
    let (header_len, refcount_order) = if version == 3 {
        if head_len < V3_HEADER_LEN {
            return Err(HeaderError::TooShort(file_len));
        }
        let incompatible = be64(&head, 72);
        for bit in 0..64u32 {
            if incompatible & (1 << bit) != 0 {
                let name = INCOMPATIBLE
                    .iter()
                    .find(|(b, _)| *b == bit)
                    .map_or("unknown", |(_, n)| n);
                return Err(HeaderError::Incompatible { bit, name });
            }
        }
        let refcount_order = be32(&head, 96);
        let header_len = be32(&head, 100);
        if (header_len as usize) < V3_HEADER_LEN || header_len as usize > head_len {
            return Err(field(
                "header_length",
                header_len.into(),
                "must be 104 bytes to one cluster, inside the file",
            ));
        }
        (header_len as usize, refcount_order)
    } else {
        (V2_HEADER_LEN, 4)
    };
    if refcount_order > 6 {
        return Err(field(
            "refcount_order",
            refcount_order.into(),
            "refcounts are 1 to 64 bits",
        ));
    }

    let size = be64(&head, 24);
    // Each L2 table maps cluster/8 clusters.
    let l2_span = cluster * (cluster / 8);
    let l1_size = u64::from(be32(&head, 36));
    let l1_needed = size.div_ceil(l2_span);
    if l1_size < l1_needed {
        return Err(field("l1_size", l1_size, "too small for the virtual size"));
    }
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(field("l1_size", l1_size, "the L1 table is over 32 MiB"));
    }
    let l1_offset = be64(&head, 40);
    if l1_size > 0 && (l1_offset == 0 || !l1_offset.is_multiple_of(cluster)) {
        return Err(field(
            "l1_table_offset",
            l1_offset,
            "must be cluster aligned and not 0",
        ));
    }
    inside("L1 table", l1_offset, l1_size * 8, file_len)?;

    let rt_offset = be64(&head, 48);
    let rt_clusters = u64::from(be32(&head, 56));
    if rt_offset == 0 || !rt_offset.is_multiple_of(cluster) {
        return Err(field(
            "refcount_table_offset",
            rt_offset,
            "must be cluster aligned and not 0",
        ));
    }
    if rt_clusters == 0 || rt_clusters * cluster > MAX_REFTABLE_BYTES {
        return Err(field(
            "refcount_table_clusters",
            rt_clusters,
            "the refcount table must be 1 cluster to 8 MiB",
        ));
    }
    // The table may end in a cluster that is only partly written.
    inside("refcount table", rt_offset, 1, file_len)?;

    let nb_snapshots = be32(&head, 60);
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(field(
            "nb_snapshots",
            nb_snapshots.into(),
            "more than 65536",
        ));
    }
    if nb_snapshots > 0 {
        inside("snapshot table", be64(&head, 64), 1, file_len)?;
        if writable {
            return Err(HeaderError::Snapshots(nb_snapshots));
        }
    }

    let backing_file = backing_name(&head, header_len)?;
    // Extensions end where the backing file name starts, if there is one.
    let ext_end = match backing_file {
        Some(_) => be64(&head, 8) as usize,
        None => head.len(),
    };
    let backing_format = extensions(&head[..ext_end], header_len)?;

    walk_l1(file, file_len, cluster, l1_offset, l1_size)?;
    walk_reftable(file, file_len, cluster, rt_offset, rt_clusters * cluster)?;

    Ok(Header {
        version,
        cluster_bits,
        size,
        backing_file,
        backing_format,
    })
}

fn backing_name(head: &[u8], header_len: usize) -> Result<Option<String>, HeaderError> {
    let offset = be64(head, 8);
    let len = be32(head, 16);
    if offset == 0 {
        return Ok(None);
    }
    if len > MAX_BACKING_NAME {
        return Err(field(
            "backing_file_size",
            len.into(),
            "backing file names are at most 1023 bytes",
        ));
    }
    let end = offset.checked_add(len.into());
    if offset < header_len as u64 || end.is_none_or(|e| e > head.len() as u64) {
        return Err(field(
            "backing_file_offset",
            offset,
            "the name must lie in the header cluster, after the header",
        ));
    }
    let name = &head[offset as usize..offset as usize + len as usize];
    String::from_utf8(name.to_vec())
        .map(Some)
        .map_err(|_| HeaderError::NotUtf8("name"))
}

/// Walks the header extensions; returns the backing format, if recorded.
fn extensions(head: &[u8], header_len: usize) -> Result<Option<String>, HeaderError> {
    let mut at = header_len;
    let mut format = None;
    // Each extension takes at least 8 bytes, so this ends within the cluster.
    while at + 8 <= head.len() {
        let kind = be32(head, at);
        let len = be32(head, at + 4) as usize;
        if kind == EXT_END {
            return Ok(format);
        }
        let data = at + 8;
        let end = data
            .checked_add(len.next_multiple_of(8))
            .filter(|e| *e <= head.len())
            .ok_or(HeaderError::Extension { kind, at })?;
        if kind == EXT_BACKING_FORMAT {
            let f = std::str::from_utf8(&head[data..data + len])
                .map_err(|_| HeaderError::NotUtf8("format"))?;
            format = Some(f.to_string());
        }
        at = end;
    }
    // No end marker: the area is full or holds no extensions (v2).
    Ok(format)
}

fn walk_l1(
    file: &File,
    file_len: u64,
    cluster: u64,
    l1_offset: u64,
    l1_size: u64,
) -> Result<(), HeaderError> {
    if l1_size == 0 {
        return Ok(());
    }
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    read(file, &mut l1, l1_offset)?;
    let mut l2 = vec![0u8; cluster as usize];
    let mut seen = HashSet::new();
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let entry = be64(e, 0);
        let off = entry & OFFSET_MASK;
        if entry & !(OFFSET_MASK | 1 << 63) != 0 || !off.is_multiple_of(cluster) {
            return Err(HeaderError::Entry {
                table: "L1",
                index: i as u64,
                entry,
            });
        }
        if off == 0 || !seen.insert(off) {
            continue;
        }
        // L2 tables are written whole.
        inside("L2 table", off, cluster, file_len)?;
        read(file, &mut l2, off)?;
        walk_l2(&l2, file_len, cluster)?;
    }
    Ok(())
}

fn walk_l2(l2: &[u8], file_len: u64, cluster: u64) -> Result<(), HeaderError> {
    let cluster_bits = cluster.trailing_zeros();
    for (i, e) in l2.chunks_exact(8).enumerate() {
        let entry = be64(e, 0);
        let bad = || HeaderError::Entry {
            table: "L2",
            index: i as u64,
            entry,
        };
        let off = if entry & L2_COMPRESSED != 0 {
            // Host offset in bits 0..62-(cluster_bits-8).
            let x = 62 - (cluster_bits - 8);
            entry & ((1u64 << x) - 1)
        } else {
            let off = entry & OFFSET_MASK;
            if entry & !(OFFSET_MASK | 1 << 63 | 1) != 0 || !off.is_multiple_of(cluster) {
                return Err(bad());
            }
            off
        };
        if off == 0 {
            continue;
        }
        // A data cluster must start inside the file (the last one may be
        // written only in part; imago reads past the end as zeros).
        if off >= file_len {
            return Err(HeaderError::OutsideFile {
                table: "data cluster",
                offset: off,
                len: cluster,
                file_len,
            });
        }
    }
    Ok(())
}

fn walk_reftable(
    file: &File,
    file_len: u64,
    cluster: u64,
    rt_offset: u64,
    rt_bytes: u64,
) -> Result<(), HeaderError> {
    // Only the part of the table inside the file is read; the rest is zero.
    let len = rt_bytes.min(file_len - rt_offset);
    let mut rt = vec![0u8; (len as usize) & !7];
    read(file, &mut rt, rt_offset)?;
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let entry = be64(e, 0);
        if entry & 0x1ff != 0 {
            return Err(HeaderError::Entry {
                table: "refcount table",
                index: i as u64,
                entry,
            });
        }
        if entry != 0 {
            if !entry.is_multiple_of(cluster) {
                return Err(HeaderError::Entry {
                    table: "refcount table",
                    index: i as u64,
                    entry,
                });
            }
            inside("refcount block", entry, 1, file_len)?;
        }
    }
    Ok(())
}
