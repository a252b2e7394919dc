//! The local terminal: whether stdio are terminals, their size, raw mode
//! (restored on drop, hence also on errors and panics), and stdin read on
//! its own thread so that a blocked read never holds up the exit.

use std::io::Read;

use tokio::sync::mpsc;

/// Whether `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number; any value is safe.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size (columns, rows) of the terminal on stdout, else stdin, else 80x25.
pub fn size() -> (u16, u16) {
    for fd in [1, 0, 2] {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into the valid, exclusively borrowed `ws`.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return (ws.ws_col, ws.ws_row);
        }
    }
    (80, 25)
}

/// Raw mode on stdin's terminal, restored when dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal on stdin in raw mode (`None` when stdin is no terminal).
    pub fn enable() -> Option<RawMode> {
        if !is_tty(0) {
            return None;
        }
        // SAFETY: termios is plain old data; all-zero is a valid value that tcgetattr overwrites.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the valid, exclusively borrowed `t`.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw only modifies the termios it is given.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: tcsetattr reads the valid termios `t`.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read by tcgetattr in `enable`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Reads stdin on a thread; each chunk arrives on the channel, EOF (or a
/// read error) closes it. The thread is left behind at exit.
pub fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });
    rx
}
