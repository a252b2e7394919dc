//! Attaching the host's stdio to a process in the guest: stdin streamed
//! in, stdout and stderr streamed out, and on a TTY the host terminal in
//! raw mode with its size followed (SIGWINCH → resize).

use std::io;

use skiff_agent_client::{AgentClient, ClientError, ExecControl, ExecEvent};
use skiff_agent_proto::{ExecRequest, ExitStatus, WindowSize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

/// Errors of an attached exec.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The agent failed.
    #[error("exec in the guest")]
    Agent(#[from] ClientError),
    /// The host's stdio failed.
    #[error("host stdio")]
    Io(#[source] io::Error),
    /// The process ended without an exit status.
    #[error("the exec ended without an exit status")]
    NoStatus,
}

/// Whether fd is a terminal.
pub fn isatty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size of the terminal on fd, if it is one.
pub fn window_size(fd: i32) -> Option<WindowSize> {
    // SAFETY: winsize is plain data; all-zero is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some(WindowSize { rows: ws.ws_row, cols: ws.ws_col })
}

/// The host terminal in raw mode until dropped.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal on `fd` in raw mode.
    pub fn enter(fd: i32) -> io::Result<RawMode> {
        // SAFETY: termios is plain data; all-zero is valid.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into `t`, a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the valid termios `t`.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: tcsetattr reads the valid termios `t`.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the termios saved by `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Runs `request` with the host's stdio attached; when `tty` is set the
/// exec gets a TTY of the host terminal's size (the caller sets raw
/// mode). `on_start` receives the control handle (to signal it from
/// elsewhere). Its exit status.
pub async fn run_attached(
    agent: &AgentClient,
    mut request: ExecRequest,
    tty: bool,
    on_start: impl FnOnce(ExecControl),
) -> Result<ExitStatus, AttachError> {
    if tty {
        request.tty = Some(window_size(0).unwrap_or(WindowSize { rows: 24, cols: 80 }));
    }
    request.stdin = true;
    let mut session = agent.exec(request).await?;
    let control = session.control();
    on_start(control.clone());

    let stdin_ctl = control.clone();
    let feeder = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdin_ctl.write_stdin(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stdin_ctl.close_stdin().await;
    });
    let resizer = tty.then(|| {
        let ctl = control.clone();
        tokio::spawn(async move {
            let Ok(mut winch) = signal(SignalKind::window_change()) else { return };
            while winch.recv().await.is_some() {
                if let Some(ws) = window_size(0) {
                    if ctl.resize(ws.rows, ws.cols).await.is_err() {
                        return;
                    }
                }
            }
        })
    });

    let (mut out, mut err) = (tokio::io::stdout(), tokio::io::stderr());
    let status = loop {
        match session.next_event().await? {
            Some(ExecEvent::Stdout(b)) => {
                out.write_all(&b).await.map_err(AttachError::Io)?;
                out.flush().await.map_err(AttachError::Io)?;
            }
            Some(ExecEvent::Stderr(b)) => {
                err.write_all(&b).await.map_err(AttachError::Io)?;
                err.flush().await.map_err(AttachError::Io)?;
            }
            Some(ExecEvent::Exit(st)) => break st,
            None => return Err(AttachError::NoStatus),
        }
    };
    feeder.abort();
    if let Some(r) = resizer {
        r.abort();
    }
    Ok(status)
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT received by this process to
/// the exec (for a process attached without a TTY, like `docker run`'s
/// signal proxy). Runs until aborted.
pub fn forward_signals(control: ExecControl) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let kinds = [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
            (SignalKind::quit(), libc::SIGQUIT),
        ];
        let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(8);
        for (kind, num) in kinds {
            let Ok(mut s) = signal(kind) else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(num).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        while let Some(sig) = rx.recv().await {
            let _ = control.signal(sig).await;
        }
    })
}
