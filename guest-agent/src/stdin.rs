//! An exec's stdin: a writer thread per process, fed through a bounded
//! queue, so that the connection thread never blocks on a process that
//! reads slowly or not at all and keeps reading signals and resizes.
//!
//! Flow control: the queue holds at most [`STDIN_WINDOW`] bytes, counted
//! until they are written to the process. A client of protocol version 2
//! sends no more than that beyond the `stdin_credit` the writer sends back
//! after each chunk, so for it [`Stdin::push`] never waits. A version-1
//! client gets the old behaviour: the connection thread waits while the
//! queue is full, which holds the client back through the transport.
//!
//! ```text
//! connection thread --push--> [queue ≤ STDIN_WINDOW] --writer thread--> pipe / TTY
//!        ^                                                  |
//!        +-------------- stdin_credit {id, bytes} ----------+ (version 2)
//! ```

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use skiff_agent_proto::{AgentMessage, STDIN_WINDOW};

use crate::sink::Sink;

/// Sent to a TTY for end of input (^D).
const EOT: u8 = 4;

/// Where the writer reports what it wrote (version-2 connections).
pub struct Credit {
    /// The connection.
    pub sink: Arc<Sink>,
    /// The exec's request id.
    pub id: u64,
    /// Set (under its lock) once `exec_exit` went out: no credit after it.
    pub exited: Arc<Mutex<bool>>,
}

enum Chunk {
    Data(Vec<u8>),
    End,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    /// Bytes pushed and not yet written (or dropped) by the writer.
    queued: usize,
    /// The handle is gone: the writer stops.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The stdin of one running exec.
pub struct Stdin {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Stdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stdin")
    }
}

impl Stdin {
    /// Starts the writer for `target` (a pipe, or the TTY master when `tty`).
    pub fn spawn(target: File, tty: bool, credit: Option<Credit>) -> io::Result<Stdin> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || writer(&s, Some(target), tty, credit.as_ref()))?;
        Ok(Stdin { shared })
    }

    /// Queues stdin bytes; an empty chunk is end of input (on a TTY: ^D).
    /// Waits only while the queue holds a whole window (a client that
    /// ignores its credit).
    pub fn push(&self, bytes: &[u8]) {
        let window = STDIN_WINDOW as usize;
        let mut q = self.shared.lock();
        while q.queued > 0 && q.queued + bytes.len() > window && !q.closed {
            q = self
                .shared
                .changed
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
        q.queued += bytes.len();
        q.chunks.push_back(if bytes.is_empty() {
            Chunk::End
        } else {
            Chunk::Data(bytes.to_vec())
        });
        drop(q);
        self.shared.changed.notify_all();
    }
}

impl Drop for Stdin {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// The writer thread: writes chunks in order until the handle is dropped.
/// After end of input on pipes, later chunks are dropped but still
/// credited. After a write error (the process closed its stdin, usually
/// because it ended) chunks are dropped and no longer credited: the
/// client's writer then waits for the exit and learns that the exec
/// ended, instead of racing the exit with credit for stdin nobody read.
fn writer(shared: &Shared, mut target: Option<File>, tty: bool, credit: Option<&Credit>) {
    let mut broken = false;
    loop {
        let chunk = {
            let mut q = shared.lock();
            loop {
                if let Some(c) = q.chunks.pop_front() {
                    break c;
                }
                if q.closed {
                    return;
                }
                q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let len = match chunk {
            Chunk::Data(bytes) => {
                if let Some(f) = target.as_mut() {
                    if f.write_all(&bytes).is_err() {
                        target = None;
                        broken = true;
                    }
                }
                bytes.len()
            }
            Chunk::End if tty => {
                if let Some(f) = target.as_mut() {
                    if f.write_all(&[EOT]).is_err() {
                        target = None;
                        broken = true;
                    }
                }
                0
            }
            Chunk::End => {
                target = None;
                0
            }
        };
        shared.lock().queued -= len;
        shared.changed.notify_all();
        if let (Some(c), true) = (credit, len > 0 && !broken) {
            let exited = c.exited.lock().unwrap_or_else(|e| e.into_inner());
            if !*exited {
                let msg = AgentMessage::StdinCredit {
                    id: c.id,
                    bytes: len as u64,
                };
                // A broken connection ends the exec through its reader.
                let _ = c.sink.send(&msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array, which is valid.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    #[test]
    fn a_reader_that_does_not_read_never_blocks_pushes_within_the_window() {
        let (mut r, w) = pipe();
        let stdin = Stdin::spawn(w, false, None).unwrap();
        let chunk = vec![7u8; 256 * 1024];
        let t = std::time::Instant::now();
        for _ in 0..(STDIN_WINDOW as usize / chunk.len()) {
            stdin.push(&chunk);
        }
        assert!(t.elapsed() < Duration::from_secs(2), "push waited");
        // One more chunk waits until the reader makes room.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pusher = {
            let done = done.clone();
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                stdin.push(&chunk);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                stdin.push(&[]);
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!done.load(std::sync::atomic::Ordering::SeqCst));
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        pusher.join().unwrap();
        assert_eq!(all.len(), STDIN_WINDOW as usize + chunk.len());
        assert!(all.iter().all(|b| *b == 7));
    }

    #[test]
    fn a_closed_stdin_drops_the_rest_and_the_writer_ends() {
        let (r, w) = pipe();
        drop(r);
        let stdin = Stdin::spawn(w, false, None).unwrap();
        for _ in 0..8 {
            stdin.push(&[1u8; 300 * 1024]);
        }
        stdin.push(&[]);
        let shared = stdin.shared.clone();
        drop(stdin);
        for _ in 0..200 {
            if Arc::strong_count(&shared) == 1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the writer thread did not end");
    }
}
