//! COM1: a 16550 UART (vm-superio) whose output goes to stdout or a file,
//! and to the client of its console socket if it has one
//! ([`super::serial_socket`]).
//!
//! The output path also watches for the kernel's panic banner, so that a
//! panicking guest ends the VMM with a clear error instead of rebooting in
//! a loop or hanging (the kernel lines after the banner are kept for the
//! message).

use std::io::Write;
use std::sync::Arc;

use vm_device::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::serial_socket::SocketOutput;
use crate::exit::{ExitReason, ExitState};

const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";
const MAX_PANIC_LINE: usize = 512;

/// Where the guest's serial output goes, with the panic watch.
pub struct SerialOutput {
    sink: Box<dyn Write + Send>,
    socket: Option<SocketOutput>,
    exit: Arc<ExitState>,
    matched: usize,
    panic_line: Option<Vec<u8>>,
}

impl SerialOutput {
    pub fn new(sink: Box<dyn Write + Send>, exit: Arc<ExitState>) -> Self {
        Self { sink, socket: None, exit, matched: 0, panic_line: None }
    }

    /// The same output, also to the console socket's client.
    pub fn with_socket(mut self, socket: SocketOutput) -> Self {
        self.socket = Some(socket);
        self
    }

    fn watch(&mut self, b: u8) {
        if let Some(line) = self.panic_line.as_mut() {
            if b == b'\n' || line.len() >= MAX_PANIC_LINE {
                let text = String::from_utf8_lossy(line).trim().to_string();
                self.panic_line = None;
                self.exit.request(ExitReason::GuestPanic(text));
            } else if b != b'\r' {
                line.push(b);
            }
            return;
        }
        if b == PANIC_BANNER[self.matched] {
            self.matched += 1;
            if self.matched == PANIC_BANNER.len() {
                self.matched = 0;
                self.panic_line = Some(PANIC_BANNER.to_vec());
            }
        } else {
            // The banner has no repeated prefix, so restarting is exact.
            self.matched = usize::from(b == PANIC_BANNER[0]);
        }
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.watch(b);
        }
        // Output errors (a closed stdout) must not stop the guest.
        let _ = self.sink.write_all(buf);
        if let Some(s) = self.socket.as_mut() {
            let _ = s.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.sink.flush();
        Ok(())
    }
}

/// Raises the UART's interrupt by writing an eventfd registered as an irqfd.
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART on the port bus.
pub struct SerialDevice {
    inner: Serial<IrqLine, NoEvents, SerialOutput>,
}

/// Declares [`SerialSnapshot`], vm-superio's `SerialState` as serde data,
/// and the conversions both ways, from one list of fields.
macro_rules! serial_snapshot {
    ($($field:ident: $ty:ty),+ $(,)?) => {
        /// The UART's registers and unread input, for a snapshot.
        #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct SerialSnapshot {
            $(pub $field: $ty,)+
        }

        impl From<vm_superio::serial::SerialState> for SerialSnapshot {
            fn from(s: vm_superio::serial::SerialState) -> Self {
                Self { $($field: s.$field,)+ }
            }
        }

        impl From<SerialSnapshot> for vm_superio::serial::SerialState {
            fn from(s: SerialSnapshot) -> Self {
                Self { $($field: s.$field,)+ }
            }
        }
    };
}

serial_snapshot! {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// A saved UART that cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("the saved serial input holds {0} bytes, more than the UART's FIFO")]
    Fifo(usize),
}

impl SerialDevice {
    /// `irq` is written whenever the UART raises its interrupt.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self { inner: Serial::new(IrqLine(irq), out) }
    }

    /// Queues host input for the guest to read. Returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// A UART restored from `s`.
    pub fn from_state(s: &SerialSnapshot, irq: EventFd, out: SerialOutput) -> Result<Self, SerialError> {
        let inner = Serial::from_state(&s.clone().into(), IrqLine(irq), NoEvents, out)
            .map_err(|_| SerialError::Fifo(s.in_buffer.len()))?;
        Ok(Self { inner })
    }

    /// The registers and unread input.
    pub fn state(&self) -> SerialSnapshot {
        self.inner.state().into()
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(off, v) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_panic_is_caught() {
        let exit = Arc::new(ExitState::new().unwrap());
        let sink = Shared::default();
        let mut dev =
            SerialDevice::new(EventFd::new(0).unwrap(), SerialOutput::new(Box::new(sink.clone()), exit.clone()));
        for b in b"hello\nKKernel panic - not syncing: No working init found.\r\nmore" {
            dev.write(0x3f8, 0, &[*b]);
        }
        assert!(String::from_utf8_lossy(&sink.0.lock().unwrap()).starts_with("hello\n"));
        assert_eq!(
            exit.reason(),
            Some(ExitReason::GuestPanic("Kernel panic - not syncing: No working init found.".into()))
        );
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), SerialOutput::new(Box::new(std::io::sink()), exit));
        assert_eq!(dev.enqueue_input(b"x"), 1);
        let mut b = [0u8];
        dev.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn state_round_trips_and_an_overfull_fifo_is_refused() {
        let exit = Arc::new(ExitState::new().unwrap());
        let out = || SerialOutput::new(Box::new(std::io::sink()), exit.clone());
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), out());
        dev.write(0x3f8, 3, &[0x03]); // LCR: 8N1
        dev.write(0x3f8, 1, &[0x02]); // IER: THR empty
        dev.enqueue_input(b"ab");
        let s = dev.state();
        assert_eq!((s.line_control, s.interrupt_enable, s.in_buffer.as_slice()), (0x03, 0x02, &b"ab"[..]));
        let back = SerialDevice::from_state(&s, EventFd::new(0).unwrap(), out()).unwrap();
        assert_eq!(back.state(), s);
        let big = SerialSnapshot { in_buffer: vec![0; 65], ..s };
        assert!(SerialDevice::from_state(&big, EventFd::new(0).unwrap(), out()).is_err());
    }
}
