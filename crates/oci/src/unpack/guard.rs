//! The reader under the tar parser: counts and hashes the uncompressed
//! layer, stops it at the layer's size limit, and bounds what the parser
//! reads *between* entries.
//!
//! The `tar` crate reads a GNU long name (`L`), long link (`K`) or PAX
//! extended header (`x`) whole into memory, and a GNU sparse map into a
//! list, before it hands out the entry they describe, so their declared
//! size is the attacker's to choose. While the parser looks for the next
//! entry (a "step", opened by [`Guard::begin`]) this reader follows the
//! same header chain it is reading and refuses an extension header over
//! its limit *before* its data is read; a step reading more than
//! [`MAX_STEP`] bytes in all is refused too, should the two ever disagree.

use std::cell::{Cell, RefCell};
use std::io::{self, Read};
use std::rc::Rc;

use crate::digest::Hasher;

/// Largest GNU long name or long link (`L`, `K`): 64 KiB, 16 times
/// `PATH_MAX`.
pub const MAX_LONG_NAME: u64 = 64 << 10;
/// Largest PAX extended header (`x`): 1 MiB (room for many xattrs of up
/// to the kernel's 64 KiB each).
pub const MAX_PAX: u64 = 1 << 20;
/// Largest GNU sparse map in extension blocks: 1 MiB (43,000 regions).
pub const MAX_SPARSE_MAP: u64 = 1 << 20;
/// Most bytes read while looking for one entry: padding, two long names,
/// a PAX header, the entry's header and its sparse map fit well.
pub const MAX_STEP: u64 = 4 << 20;

const BLOCK: u64 = 512;

/// Why the reader stopped the parser; travels inside an `io::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hit {
    /// The layer's uncompressed size limit.
    LayerSize,
    /// An extension header over its limit.
    Header {
        /// `GNU long name`, `GNU long link`, `PAX extended header` or `GNU
        /// sparse map`.
        what: &'static str,
        /// Its declared size (for a sparse map: bytes read so far).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The headers of one entry took more than [`MAX_STEP`] bytes.
    Step,
}

impl std::fmt::Display for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LayerSize => f.write_str("layer size limit reached"),
            Self::Header { what, size, limit } => {
                write!(f, "{what} of {size} bytes, over the {limit}-byte limit")
            }
            Self::Step => write!(f, "entry headers over {MAX_STEP} bytes"),
        }
    }
}

impl std::error::Error for Hit {}

/// The `Hit` inside an error from the parser, if that is what stopped it.
pub fn hit(e: &io::Error) -> Option<&Hit> {
    e.get_ref().and_then(|i| i.downcast_ref::<Hit>())
}

enum State {
    /// Bytes to pass over (padding, an extension header's data).
    Skip(u64),
    /// Filling a header block.
    Header,
    /// Filling a GNU sparse extension block.
    Sparse,
    /// The entry's own header is in: the parser hands it out.
    Done,
}

/// Follows the header chain of one step.
pub struct Guard {
    active: bool,
    state: State,
    block: Box<[u8; BLOCK as usize]>,
    filled: usize,
    step: u64,
    sparse: u64,
}

impl Guard {
    /// A guard with no step open.
    pub fn new() -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self {
            active: false,
            state: State::Done,
            block: Box::new([0; BLOCK as usize]),
            filled: 0,
            step: 0,
            sparse: 0,
        }))
    }

    /// The parser is about to look for the next entry; `pos` is how far
    /// the stream has been read (headers start on 512-byte boundaries).
    pub fn begin(&mut self, pos: u64) {
        self.active = true;
        self.state = State::Skip((BLOCK - pos % BLOCK) % BLOCK);
        self.filled = 0;
        self.step = 0;
        self.sparse = 0;
    }

    /// The parser handed out an entry (or failed): its data is not ours.
    pub fn end(&mut self) {
        self.active = false;
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), Hit> {
        if !self.active {
            return Ok(());
        }
        self.step += data.len() as u64;
        if self.step > MAX_STEP {
            return Err(Hit::Step);
        }
        while !data.is_empty() {
            match self.state {
                State::Skip(n) => {
                    let k = n.min(data.len() as u64);
                    data = &data[k as usize..];
                    self.state = if n == k {
                        State::Header
                    } else {
                        State::Skip(n - k)
                    };
                }
                State::Header | State::Sparse => {
                    let k = (BLOCK as usize - self.filled).min(data.len());
                    self.block[self.filled..self.filled + k].copy_from_slice(&data[..k]);
                    self.filled += k;
                    data = &data[k..];
                    if self.filled == BLOCK as usize {
                        self.filled = 0;
                        self.state = match self.state {
                            State::Sparse => self.sparse_block()?,
                            _ => self.header_block()?,
                        };
                    }
                }
                State::Done => return Ok(()),
            }
        }
        Ok(())
    }

    /// What follows a header block, as the `tar` crate (0.4) reads it:
    /// extension headers only count in a GNU or ustar header.
    fn header_block(&mut self) -> Result<State, Hit> {
        if self.block.iter().all(|&b| b == 0) {
            return Ok(State::Done);
        }
        let h = tar::Header::from_byte_slice(&self.block[..]);
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        let kind = h.entry_type();
        let (what, limit) = match kind {
            tar::EntryType::GNULongName if recognized => ("GNU long name", MAX_LONG_NAME),
            tar::EntryType::GNULongLink if recognized => ("GNU long link", MAX_LONG_NAME),
            tar::EntryType::XHeader if recognized => ("PAX extended header", MAX_PAX),
            tar::EntryType::GNUSparse => {
                return Ok(match h.as_gnu() {
                    Some(g) if g.is_extended() => State::Sparse,
                    _ => State::Done,
                });
            }
            _ => return Ok(State::Done),
        };
        // An unreadable size is the parser's error to report.
        let Ok(size) = h.entry_size() else {
            return Ok(State::Done);
        };
        if size > limit {
            return Err(Hit::Header { what, size, limit });
        }
        Ok(State::Skip(size.next_multiple_of(BLOCK)))
    }

    fn sparse_block(&mut self) -> Result<State, Hit> {
        self.sparse += BLOCK;
        if self.sparse > MAX_SPARSE_MAP {
            return Err(Hit::Header {
                what: "GNU sparse map",
                size: self.sparse,
                limit: MAX_SPARSE_MAP,
            });
        }
        // `isextended`, the byte after 21 sparse records of 24 bytes.
        Ok(if self.block[504] != 0 {
            State::Sparse
        } else {
            State::Done
        })
    }
}

/// A reader that fails once more than `left` bytes have come through,
/// hashes what does, and feeds the [`Guard`].
pub struct Limit<R> {
    /// The decompressed layer.
    pub inner: R,
    /// Bytes still allowed.
    pub left: u64,
    /// Bytes read so far (shared with the caller).
    pub read: Rc<Cell<u64>>,
    /// The uncompressed digest, if wanted.
    pub hasher: Option<Hasher>,
    /// The step guard (shared with the caller).
    pub guard: Rc<RefCell<Guard>>,
}

impl<R: Read> Read for Limit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(Hit::LayerSize));
        }
        self.guard
            .borrow_mut()
            .feed(&buf[..n])
            .map_err(io::Error::other)?;
        self.left -= n as u64;
        self.read.set(self.read.get() + n as u64);
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

impl<R: Read> Limit<R> {
    /// A guarded reader of at most `left` bytes, hashing with SHA-256 when
    /// `hash`.
    pub fn new(inner: R, left: u64, hash: bool) -> Self {
        Self {
            inner,
            left,
            read: Rc::new(Cell::new(0)),
            hasher: hash.then(|| Hasher::new(crate::digest::Algorithm::Sha256)),
            guard: Guard::new(),
        }
    }
}

/// Iterates a tar archive read through a [`Limit`], guarding each search
/// for the next entry. Read each entry's data to its end (or drop it
/// after reading it) before asking for the next: what is left is read in
/// the guarded search.
pub struct Entries<'a, R: Read> {
    inner: tar::Entries<'a, Limit<R>>,
    guard: Rc<RefCell<Guard>>,
    pos: Rc<Cell<u64>>,
}

/// What [`Entries`] shares with the [`Limit`] under the archive.
pub struct Handles(Rc<RefCell<Guard>>, Rc<Cell<u64>>);

impl<R> Limit<R> {
    /// Take before wrapping the reader in a `tar::Archive`.
    pub fn handles(&self) -> Handles {
        Handles(self.guard.clone(), self.read.clone())
    }
}

impl<'a, R: Read> Entries<'a, R> {
    /// The entries of `ar`, whose reader gave `h`.
    pub fn new(ar: &'a mut tar::Archive<Limit<R>>, h: Handles) -> io::Result<Self> {
        Ok(Self {
            inner: ar.entries()?,
            guard: h.0,
            pos: h.1,
        })
    }

    /// Bytes read so far.
    pub fn pos(&self) -> u64 {
        self.pos.get()
    }
}

impl<'a, R: Read> Iterator for Entries<'a, R> {
    type Item = io::Result<tar::Entry<'a, Limit<R>>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.guard.borrow_mut().begin(self.pos.get());
        let next = self.inner.next();
        self.guard.borrow_mut().end();
        next
    }
}
