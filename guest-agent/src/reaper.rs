//! The one place that waits for children.
//!
//! As PID 1 the agent must reap every zombie, including orphans it never
//! started, while exec and the main process still need their own child's
//! status. A single thread therefore waits for all children and hands each
//! status to whoever registered that pid. It peeks with `WNOWAIT` and reaps
//! only while holding the registry lock, and [`Reaper::spawn`] holds that
//! lock across `fork`/`exec`: so std's own wait for a child whose `exec`
//! failed never races with this thread, and a child that exits at once is
//! registered before its status is looked up.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use skiff_agent_proto::ExitStatus;

/// Waits for all children and dispatches their statuses.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, Sender<ExitStatus>>>,
    spawned: Condvar,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    /// Spawns `cmd`; the receiver gets its exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = channel();
        waiters.insert(child.id() as i32, tx);
        drop(waiters);
        self.spawned.notify_all();
        Ok((child, rx))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Sender<ExitStatus>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            // SAFETY: siginfo_t is plain data; all-zero is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes only into `info`, which outlives the call.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    _ => {
                        // No children: sleep until one is spawned (or a
                        // while, for orphans handed to PID 1).
                        let guard = self.lock();
                        let _ = self.spawned.wait_timeout(guard, Duration::from_secs(1));
                        continue;
                    }
                }
            }
            // SAFETY: waitid succeeded with WEXITED, so si_pid is set.
            let pid = unsafe { info.si_pid() };
            let mut waiters = self.lock();
            let mut status = 0;
            // SAFETY: plain syscall; `status` outlives it.
            let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if got == pid {
                if let Some(tx) = waiters.remove(&pid) {
                    let _ = tx.send(ExitStatus::from_wait_status(status));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatches_statuses_to_the_right_waiters() {
        let reaper = Reaper::start().unwrap();
        let mut rxs = Vec::new();
        for code in 0..8 {
            let (_child, rx) = reaper
                .spawn(Command::new("/bin/sh").args(["-c", &format!("exit {code}")]))
                .unwrap();
            rxs.push((code, rx));
        }
        for (code, rx) in rxs {
            let st = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(st, ExitStatus::Exited { code });
        }
        let err = reaper
            .spawn(&mut Command::new("/nonexistent/skiff"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
