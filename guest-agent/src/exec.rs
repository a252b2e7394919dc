//! Running processes for `exec` (and the main process): pipes or a new
//! TTY, identity, output pumps, stdin, signals and window size.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use skiff_agent_proto::{Channel, ExecRequest, ExitStatus, Reply, User, WindowSize};

use crate::reaper::Reaper;
use crate::sink::Sink;
use crate::stdin::{Credit, Stdin};

/// `PATH` for processes whose environment has none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const READ_CHUNK: usize = 64 * 1024;

/// Errors of starting a process (other than a missing program).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `argv` is empty.
    #[error("argv is empty")]
    EmptyArgv,
    /// The working directory does not exist.
    #[error("working directory {0:?} does not exist")]
    NoCwd(String),
    /// No TTY could be allocated.
    #[error("allocating a pty")]
    Pty(#[source] io::Error),
    /// fork or exec failed.
    #[error("starting the process")]
    Spawn(#[source] io::Error),
    /// A helper thread could not be started.
    #[error("starting a thread")]
    Thread(#[source] io::Error),
}

/// What became of an exec request.
pub enum Started {
    /// It runs.
    Running(Arc<ExecHandle>),
    /// The program could not be executed; answer like a container runtime.
    NotRun {
        /// 127 (not found) or 126 (not executable).
        code: i32,
        /// The message for stderr.
        message: String,
    },
}

/// A running exec: the connection feeds it stdin, signals and resizes.
#[derive(Debug)]
pub struct ExecHandle {
    /// Its pid.
    pub pid: i32,
    stdin: Option<Stdin>,
    tty: Option<File>,
    done: Arc<AtomicBool>,
}

impl ExecHandle {
    /// Whether it ended and its exit was reported.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Queues stdin for the process (see [`Stdin::push`]); an empty chunk
    /// is end of input.
    pub fn stdin(&self, bytes: &[u8]) {
        if let Some(s) = &self.stdin {
            s.push(bytes);
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.done() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: plain syscall with integer arguments.
        if unsafe { libc::kill(self.pid, signal) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills the process's whole session (the client went away).
    pub fn kill_all(&self) {
        if !self.done() {
            // SAFETY: plain syscall; the process leads its own group.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
    }

    /// Resizes the TTY (the kernel sends SIGWINCH).
    pub fn resize(&self, size: WindowSize) -> io::Result<()> {
        let tty = self
            .tty
            .as_ref()
            .ok_or_else(|| io::Error::other("exec has no tty"))?;
        set_window_size(tty, size)
    }
}

/// Builds the environment: the request's, plus PATH (and TERM on a TTY).
pub fn environment(env: &[String], tty: bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let has = |out: &[(String, String)], k: &str| out.iter().any(|(key, _)| key == k);
    if !has(&out, "PATH") {
        out.push(("PATH".into(), DEFAULT_PATH["PATH=".len()..].into()));
    }
    if tty && !has(&out, "TERM") {
        out.push(("TERM".into(), "xterm".into()));
    }
    out
}

/// Starts `req`; its output goes to `sink` under `id`, followed by the
/// exit reply once all output was sent. With `stdin_credit` (protocol
/// version 2) the agent credits stdin back as it writes it.
pub fn start(
    req: &ExecRequest,
    id: u64,
    reaper: &Reaper,
    sink: Arc<Sink>,
    stdin_credit: bool,
) -> Result<Started, ExecError> {
    let (program, args) = req.argv.split_first().ok_or(ExecError::EmptyArgv)?;
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return Err(ExecError::NoCwd(cwd));
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(environment(&req.env, req.tty.is_some()))
        .current_dir(&cwd);
    let mut tty_master = None;
    if let Some(size) = req.tty {
        let (master, slave) = open_pty(size).map_err(ExecError::Pty)?;
        let dup = |f: &File| f.try_clone().map(Stdio::from).map_err(ExecError::Pty);
        cmd.stdin(dup(&slave)?)
            .stdout(dup(&slave)?)
            .stderr(Stdio::from(slave));
        tty_master = Some(master);
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    set_identity(&mut cmd, req.user.clone(), req.tty.is_some());

    let (mut child, exited) = match reaper.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => return not_run(program, e),
    };
    drop(cmd); // closes our copies of the TTY slave
    let pid = child.id() as i32;
    let mut pumps = Vec::new();
    let stdin = match &tty_master {
        Some(master) => {
            let out = master.try_clone().map_err(ExecError::Pty)?;
            pumps.push(pump(out, id, Channel::Stdout, sink.clone())?);
            Some(master.try_clone().map_err(ExecError::Pty)?)
        }
        None => {
            if let Some(out) = child.stdout.take() {
                pumps.push(pump(
                    File::from(OwnedFd::from(out)),
                    id,
                    Channel::Stdout,
                    sink.clone(),
                )?);
            }
            if let Some(err) = child.stderr.take() {
                pumps.push(pump(
                    File::from(OwnedFd::from(err)),
                    id,
                    Channel::Stderr,
                    sink.clone(),
                )?);
            }
            child.stdin.take().map(|s| File::from(OwnedFd::from(s)))
        }
    };
    let reported = Arc::new(Mutex::new(false));
    let stdin = match stdin {
        Some(target) => {
            let credit = stdin_credit.then(|| Credit {
                sink: sink.clone(),
                id,
                exited: reported.clone(),
            });
            let tty = tty_master.is_some();
            Some(Stdin::spawn(target, tty, credit).map_err(ExecError::Thread)?)
        }
        None => None,
    };
    let done = Arc::new(AtomicBool::new(false));
    let handle = Arc::new(ExecHandle {
        pid,
        stdin,
        tty: tty_master,
        done: done.clone(),
    });
    std::thread::Builder::new()
        .name(format!("exec-{pid}"))
        .spawn(move || finish(id, (exited, reported), pumps, done, &sink))
        .map_err(ExecError::Thread)?;
    Ok(Started::Running(handle))
}

fn not_run(program: &str, e: io::Error) -> Result<Started, ExecError> {
    let (code, what) = match e.kind() {
        io::ErrorKind::NotFound => (127, "executable file not found in $PATH"),
        io::ErrorKind::PermissionDenied => (126, "permission denied"),
        _ => return Err(ExecError::Spawn(e)),
    };
    let message = format!("skiff-agent: exec: {program:?}: {what}\n");
    Ok(Started::NotRun { code, message })
}

/// Waits for the process and its output, then reports the exit (after
/// which the stdin writer sends no more credit).
fn finish(
    id: u64,
    (exited, reported): (Receiver<ExitStatus>, Arc<Mutex<bool>>),
    pumps: Vec<JoinHandle<()>>,
    done: Arc<AtomicBool>,
    sink: &Sink,
) {
    let status = exited.recv().unwrap_or(ExitStatus::Exited { code: 255 });
    for p in pumps {
        let _ = p.join();
    }
    let mut reported = reported.lock().unwrap_or_else(|e| e.into_inner());
    *reported = true;
    done.store(true, Ordering::SeqCst);
    let _ = sink.reply(id, Reply::ExecExit { status });
}

fn pump(
    mut from: File,
    id: u64,
    channel: Channel,
    sink: Arc<Sink>,
) -> Result<JoinHandle<()>, ExecError> {
    std::thread::Builder::new()
        .name("exec-pump".into())
        .spawn(move || {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if sink.data(id, channel, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EIO: the TTY's last slave closed.
                    Err(_) => break,
                }
            }
        })
        .map_err(ExecError::Thread)
}

/// Arranges, in the child before exec: a new session (with the TTY as its
/// controlling terminal), then groups, gid, uid — in that order, since
/// std's own uid/gid set-up would run before the groups could be set.
pub fn set_identity(cmd: &mut Command, user: Option<User>, tty: bool) {
    let groups: Vec<libc::gid_t> = user
        .as_ref()
        .map(|u| u.additional_gids.clone())
        .unwrap_or_default();
    let closure = move || -> io::Result<()> {
        // SAFETY: async-signal-safe syscalls in the forked child; `groups`
        // was allocated before fork and is only read.
        unsafe {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(u) = &user {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(u.gid) < 0
                    || libc::setuid(u.uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe syscalls and
    // allocates nothing.
    unsafe { cmd.pre_exec(closure) };
}

/// Opens a pty pair of the given size; both ends close on exec.
pub fn open_pty(size: WindowSize) -> io::Result<(File, File)> {
    // SAFETY: plain syscall; the fd it returns is owned right away.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `m` is a fresh fd nobody else owns.
    let master = unsafe { File::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is an open pty master; ptsname_r writes at most
    // `name.len()` bytes into `name`.
    unsafe {
        if libc::grantpt(m) < 0
            || libc::unlockpt(m) < 0
            || libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r NUL-terminated `name`.
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh fd nobody else owns.
    let slave = unsafe { File::from_raw_fd(s) };
    set_window_size(&master, size)?;
    Ok((master, slave))
}

fn set_window_size(tty: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_adds_path_and_term_only_when_missing() {
        let env = environment(&["A=1".into(), "B=x=y".into(), "junk".into()], true);
        assert_eq!(env[0], ("A".into(), "1".into()));
        assert_eq!(env[1], ("B".into(), "x=y".into()));
        assert!(env
            .iter()
            .any(|(k, v)| k == "PATH" && v.contains("/usr/bin")));
        assert!(env.iter().any(|(k, v)| k == "TERM" && v == "xterm"));
        let env = environment(&["PATH=/x".into()], false);
        assert_eq!(env, [("PATH".into(), "/x".into())]);
    }

    fn size_of(tty: &File) -> (u16, u16) {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which is valid.
        let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(r, 0);
        (ws.ws_row, ws.ws_col)
    }

    #[test]
    fn pty_has_requested_size() {
        let (master, slave) = open_pty(WindowSize {
            rows: 33,
            cols: 101,
        })
        .unwrap();
        assert_eq!(size_of(&slave), (33, 101));
        set_window_size(&master, WindowSize { rows: 10, cols: 20 }).unwrap();
        assert_eq!(size_of(&slave), (10, 20));
    }
}
