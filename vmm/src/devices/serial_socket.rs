//! COM1's console socket (`--serial socket=PATH`): a Unix socket whose one
//! client sees the guest's serial output from the moment it connects and
//! types into the UART. A new client replaces the old one, as a console
//! server does (`incus console` taking over a console).
//!
//! The UART's output comes from vCPU threads and must never wait for the
//! client: it goes into a buffer of at most [`MAX_PENDING_OUTPUT`] bytes
//! (beyond that it is dropped and counted) that the socket's own thread
//! writes out. Input is taken from the client only as fast as the guest
//! drains the UART's 64-byte FIFO, so a paste is not cut short and a client
//! cannot make the VMM buffer without bound.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::serial::SerialDevice;

/// Output buffered for a slow client before output is dropped.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Input read from the client at once.
const INPUT_CHUNK: usize = 4096;
/// How often held-back input is offered to the UART again while the
/// guest has not drained its FIFO.
const FIFO_RETRY: Duration = Duration::from_millis(10);

/// Errors setting the socket up.
#[derive(Debug, thiserror::Error)]
pub enum SerialSocketError {
    #[error("cannot bind the serial console socket {0}")]
    Bind(String, #[source] io::Error),
    #[error("cannot create the serial console's eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot start the serial console thread")]
    Thread(#[source] io::Error),
}

/// Output for the client, shared by the UART (vCPU threads) and the
/// socket's thread.
struct Shared {
    out: Mutex<Pending>,
    /// Written when output arrives in an empty buffer.
    wake: EventFd,
}

#[derive(Default)]
struct Pending {
    buf: VecDeque<u8>,
    connected: bool,
    dropped: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The UART output's way to the client (see [`super::serial::SerialOutput`]).
pub struct SocketOutput(Arc<Shared>);

impl Write for SocketOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut p = self.0.lock();
        if !p.connected || data.is_empty() {
            return Ok(data.len());
        }
        let was_empty = p.buf.is_empty();
        let room = MAX_PENDING_OUTPUT - p.buf.len();
        let take = data.len().min(room);
        p.buf.extend(&data[..take]);
        p.dropped += (data.len() - take) as u64;
        drop(p);
        if was_empty && take > 0 {
            let _ = self.0.wake.write(1);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The bound socket, before its thread runs (the UART must exist first:
/// its output goes through [`SocketOutput`]).
pub struct SerialSocket {
    listener: UnixListener,
    shared: Arc<Shared>,
}

impl SerialSocket {
    /// Binds `path` (a stale socket there is replaced) and returns the
    /// output half for the UART.
    pub fn bind(path: &Path) -> Result<(Self, SocketOutput), SerialSocketError> {
        let listener = virtio_devices::socket::bind_listener(path)
            .map_err(|e| SerialSocketError::Bind(path.display().to_string(), e))?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(SerialSocketError::EventFd)?;
        let shared = Arc::new(Shared { out: Mutex::new(Pending::default()), wake });
        Ok((SerialSocket { listener, shared: shared.clone() }, SocketOutput(shared)))
    }

    /// Serves the socket on a thread of its own for the VMM's life.
    pub fn spawn(self, uart: Arc<Mutex<SerialDevice>>) -> Result<(), SerialSocketError> {
        std::thread::Builder::new()
            .name("serial-socket".into())
            .spawn(move || Server { socket: self, uart, client: None, held: Vec::new() }.run())
            .map(drop)
            .map_err(SerialSocketError::Thread)
    }
}

struct Server {
    socket: SerialSocket,
    uart: Arc<Mutex<SerialDevice>>,
    client: Option<UnixStream>,
    /// Client input the UART's FIFO had no room for yet.
    held: Vec<u8>,
}

impl Server {
    fn run(mut self) {
        loop {
            let pending = !self.socket.shared.lock().buf.is_empty();
            let mut fds = vec![
                pollfd(self.socket.listener.as_raw_fd(), libc::POLLIN),
                pollfd(self.socket.shared.wake.as_raw_fd(), libc::POLLIN),
            ];
            if let Some(c) = &self.client {
                let mut ev = 0;
                if self.held.is_empty() {
                    ev |= libc::POLLIN;
                }
                if pending {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.as_raw_fd(), ev));
            }
            let timeout = if self.held.is_empty() { -1 } else { FIFO_RETRY.as_millis() as i32 };
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::warn!("serial console socket: poll: {}", io::Error::last_os_error());
                return;
            }
            if fds[1].revents != 0 {
                let _ = self.socket.shared.wake.read();
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.accept();
            } else if let Some(f) = fds.get(2) {
                self.client_event(f.revents);
            }
            self.feed_uart();
            self.write_out();
        }
    }

    fn accept(&mut self) {
        let Ok((stream, _)) = self.socket.listener.accept() else { return };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        if self.client.is_some() {
            log::info!("serial console: a new client replaces the attached one");
        }
        self.held.clear();
        let mut p = self.socket.shared.lock();
        p.buf.clear();
        p.connected = true;
        drop(p);
        self.client = Some(stream);
    }

    fn client_event(&mut self, revents: libc::c_short) {
        let Some(stream) = self.client.as_mut() else { return };
        let mut gone = revents & (libc::POLLERR | libc::POLLNVAL) != 0;
        if revents & (libc::POLLIN | libc::POLLHUP) != 0 && self.held.is_empty() {
            let mut buf = [0u8; INPUT_CHUNK];
            match stream.read(&mut buf) {
                Ok(0) => gone = true,
                Ok(n) => self.held.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(_) => gone = true,
            }
        }
        if gone {
            self.drop_client();
        }
    }

    fn drop_client(&mut self) {
        self.client = None;
        self.held.clear();
        let mut p = self.socket.shared.lock();
        p.connected = false;
        p.buf.clear();
        if p.dropped > 0 {
            log::info!("serial console: the client was too slow: {} bytes of output dropped", p.dropped);
            p.dropped = 0;
        }
    }

    /// Offers held input to the UART; what its FIFO has no room for waits.
    fn feed_uart(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let n = self.uart.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(&self.held);
        self.held.drain(..n);
    }

    /// Writes buffered output to the client without blocking.
    fn write_out(&mut self) {
        let Some(stream) = self.client.as_mut() else { return };
        let mut p = self.socket.shared.lock();
        let mut failed = false;
        while !p.buf.is_empty() {
            let (front, _) = p.buf.as_slices();
            match stream.write(front) {
                Ok(0) => failed = true,
                Ok(n) => {
                    p.buf.drain(..n);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => failed = true,
            }
            break;
        }
        drop(p);
        if failed {
            self.drop_client();
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::SerialOutput;
    use crate::exit::ExitState;
    use std::io::BufRead;
    use std::time::Instant;
    use vm_device::BusDevice;

    /// A UART served on `serial.sock` in a new directory.
    fn served() -> (tempfile::TempDir, Arc<Shared>, Arc<Mutex<SerialDevice>>) {
        let dir = tempfile::tempdir().unwrap();
        let (socket, out) = SerialSocket::bind(&dir.path().join("serial.sock")).unwrap();
        let shared = out.0.clone();
        let exit = Arc::new(ExitState::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let output = SerialOutput::new(Box::new(io::sink()), exit).with_socket(out);
        let dev = Arc::new(Mutex::new(SerialDevice::new(irq, output)));
        socket.spawn(dev.clone()).unwrap();
        (dir, shared, dev)
    }

    /// Reads what the guest can read from the UART (the receive register
    /// while the line status says data is ready).
    fn guest_reads(dev: &Arc<Mutex<SerialDevice>>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut d = dev.lock().unwrap();
        loop {
            let mut lsr = [0u8];
            d.read(0, 5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return got;
            }
            let mut b = [0u8];
            d.read(0, 0, &mut b);
            got.push(b[0]);
        }
    }

    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: nothing within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn output_reaches_the_client_and_input_the_guest_whole() {
        let (dir, shared, dev) = served();
        let path = dir.path().join("serial.sock");

        // Output before any client is not kept for it.
        dev.lock().unwrap().write(0, 0, b"x");
        let client = UnixStream::connect(&path).unwrap();
        wait_for("the client attached", || shared.lock().connected.then_some(()));
        for &b in b"login: \n" {
            dev.lock().unwrap().write(0, 0, &[b]);
        }
        let mut r = io::BufReader::new(client.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "login: \n");

        // 1000 bytes of input: more than the 64-byte FIFO; all arrive, in order.
        let input: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        (&client).write_all(&input).unwrap();
        let mut got = Vec::new();
        wait_for("all input", || {
            got.extend(guest_reads(&dev));
            (got.len() >= input.len()).then_some(())
        });
        assert_eq!(got, input);
    }

    #[test]
    fn a_new_client_replaces_the_old_and_a_silent_one_costs_bounded_memory() {
        let (dir, shared, _dev) = served();
        let path = dir.path().join("serial.sock");
        let first = UnixStream::connect(&path).unwrap();
        wait_for("connected", || shared.lock().connected.then_some(()));
        // The client never reads: output piles up to the cap, then is dropped.
        let chunk = vec![b'z'; 4096];
        let mut w = SocketOutput(shared.clone());
        for _ in 0..(3 * MAX_PENDING_OUTPUT / chunk.len()) {
            w.write_all(&chunk).unwrap();
        }
        assert!(shared.lock().buf.len() <= MAX_PENDING_OUTPUT);
        assert!(shared.lock().dropped > 0);
        let second = UnixStream::connect(&path).unwrap();
        // The first client is closed: it reads the end of its stream.
        first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = Vec::new();
        let _ = (&first).read_to_end(&mut sink);
        w.write_all(b"hello\n").unwrap();
        let mut line = String::new();
        io::BufReader::new(second).read_line(&mut line).unwrap();
        assert_eq!(line, "hello\n");
    }
}
