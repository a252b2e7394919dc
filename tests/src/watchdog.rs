//! A watchdog for the steps of a long test that drives skiffd: a step that
//! runs past its limit gets a report on stderr — skiffd's log, each
//! instance's monitor and console logs, each VM's `vmm.log`, the test's
//! processes with their threads' states and kernel stacks, and what each
//! skiff-vmm's API says (`vm.info`, and `vm.counters` twice, a few seconds
//! apart: do the guest's exits still move?) — and then the test's
//! processes are killed (skiffd, its monitors and VMMs, the CLI), so the
//! call the step waits in returns with an error and the test fails,
//! instead of hanging silently until the box's timeout.
//!
//! ```text
//!   let dog = Watchdog::new(&env.dir, &env.run, &env.log);
//!   dog.step("launch vm1", Duration::from_secs(420));   // armed
//!   ... the step ...
//!   dog.step("exec", ...)                                // re-armed; `done()` disarms
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use skiff_run::vm::tail;
use skiff_vmm_client::Client as VmmClient;

/// The step armed, if any: its name, deadline and generation.
#[derive(Default)]
struct Armed {
    step: Option<(String, Instant, Duration)>,
    generation: u64,
    stop: bool,
}

/// See the module documentation.
pub struct Watchdog {
    shared: Arc<(Mutex<Armed>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the test's state lives.
#[derive(Clone)]
struct Places {
    dir: PathBuf,
    run: PathBuf,
    log: PathBuf,
}

impl Watchdog {
    /// A watchdog for the skiffd whose state is in `dir`, runtime
    /// directory `run` and log `log`.
    pub fn new(dir: &Path, run: &Path, log: &Path) -> Watchdog {
        let shared = Arc::new((Mutex::new(Armed::default()), Condvar::new()));
        let places = Places { dir: dir.to_path_buf(), run: run.to_path_buf(), log: log.to_path_buf() };
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(&s, &places))
            .expect("starting the watchdog thread");
        Watchdog { shared, thread: Some(thread) }
    }

    /// Arms the watchdog for step `name`, which may take up to `limit`.
    pub fn step(&self, name: &str, limit: Duration) {
        let (lock, cv) = &*self.shared;
        let mut a = lock.lock().unwrap_or_else(|e| e.into_inner());
        a.step = Some((name.to_string(), Instant::now() + limit, limit));
        a.generation += 1;
        cv.notify_all();
    }

    /// Disarms it.
    pub fn done(&self) {
        let (lock, cv) = &*self.shared;
        let mut a = lock.lock().unwrap_or_else(|e| e.into_inner());
        a.step = None;
        a.generation += 1;
        cv.notify_all();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            let mut a = lock.lock().unwrap_or_else(|e| e.into_inner());
            a.stop = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &(Mutex<Armed>, Condvar), places: &Places) {
    let (lock, cv) = shared;
    let mut a = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if a.stop {
            return;
        }
        let Some((name, deadline, limit)) = a.step.clone() else {
            a = cv.wait(a).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let now = Instant::now();
        if now < deadline {
            a = cv.wait_timeout(a, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            continue;
        }
        let generation = a.generation;
        drop(a);
        eprintln!("\n=== watchdog: step {name:?} has run for more than {limit:?}: the test's state ===");
        eprintln!("{}", report(places));
        eprintln!("=== watchdog: killing the test's processes so that {name:?} fails ===");
        kill_all(places);
        a = lock.lock().unwrap_or_else(|e| e.into_inner());
        if a.generation == generation {
            a.step = None;
        }
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

/// The pids whose command line names `dir` (skiffd, its monitors and
/// VMMs, the CLI pointed at it through `SKIFF_DIR` is found by its parent
/// instead) and the `skiff` processes.
fn test_processes(places: &Places) -> Vec<(u32, String)> {
    let marks = [places.dir.display().to_string(), places.run.display().to_string()];
    let mut found = Vec::new();
    for p in entries(Path::new("/proc")) {
        let Some(pid) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let env = std::fs::read(p.join("environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        if marks.iter().any(|m| cmd.contains(m.as_str()) || env.contains(&format!("SKIFF_DIR={m}"))) {
            found.push((pid, cmd.trim().to_string()));
        }
    }
    found
}

fn field(stat: &str, n: usize) -> String {
    // Fields after the command's closing parenthesis (which may hold spaces).
    stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().nth(n).unwrap_or("?").to_string()).unwrap_or_default()
}

fn threads(pid: u32) -> String {
    let mut out = String::new();
    for t in entries(&PathBuf::from(format!("/proc/{pid}/task"))) {
        let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
        let stat = read("stat");
        out.push_str(&format!(
            "    thread {} {:<12} state {} wchan {} utime {} stime {}\n",
            t.file_name().unwrap_or_default().to_string_lossy(),
            read("comm").trim(),
            field(&stat, 0),
            read("wchan"),
            field(&stat, 11),
            field(&stat, 12),
        ));
        let stack = read("stack");
        for l in stack.lines().take(12) {
            out.push_str(&format!("      {l}\n"));
        }
    }
    out
}

/// What the VMMs' APIs say: `vm.info`, and the exit counters twice.
fn vmm_state(places: &Places) -> String {
    let mut out = String::new();
    for vm in entries(&places.run.join("vm")) {
        let socket = vm.join("vmm.sock");
        if !socket.exists() {
            continue;
        }
        let c = VmmClient::new(&socket).with_timeout(Duration::from_secs(5));
        out.push_str(&format!("--- skiff-vmm API at {}\n", socket.display()));
        match c.info() {
            Ok(i) => out.push_str(&format!("vm.info: {i:?}\n")),
            Err(e) => out.push_str(&format!("vm.info: {e}\n")),
        }
        let first = c.counters();
        std::thread::sleep(Duration::from_secs(3));
        let second = c.counters();
        match (first, second) {
            (Ok(a), Ok(b)) => out.push_str(&format!("vm.counters: {:?}\n 3 s later: {:?}\n", a.vm_exits, b.vm_exits)),
            (a, b) => out.push_str(&format!("vm.counters: {:?} / {:?}\n", a.err(), b.err())),
        }
    }
    out
}

fn report(places: &Places) -> String {
    let mut out = format!("--- skiffd log ({})\n{}\n", places.log.display(), tail(&places.log, 60));
    for inst in entries(&places.dir.join("instances")) {
        for (f, n) in [("monitor.log", 30), ("console.log", 40)] {
            let p = inst.join(f);
            if p.exists() {
                out.push_str(&format!("--- {}\n{}\n", p.display(), tail(&p, n)));
            }
        }
    }
    for vm in entries(&places.run.join("vm")) {
        let p = vm.join("vmm.log");
        if p.exists() {
            out.push_str(&format!("--- {}\n{}\n", p.display(), tail(&p, 30)));
        }
    }
    out.push_str(&format!("--- load: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default()));
    out.push_str("--- the test's processes\n");
    for (pid, cmd) in test_processes(places) {
        out.push_str(&format!("  pid {pid}: {}\n{}", cmd.chars().take(300).collect::<String>(), threads(pid)));
    }
    out.push_str(&vmm_state(places));
    out
}

/// SIGKILLs the test's processes: skiffd first (the CLI's wait then fails).
fn kill_all(places: &Places) {
    for (pid, _) in test_processes(places) {
        // SAFETY: plain kill of a process this test started (its command
        // line or environment names the test's scratch directories).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    #[test]
    fn a_step_past_its_limit_is_reported_and_ends_the_tests_processes() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run, log) = (d.path().join("skiff"), d.path().join("run"), d.path().join("skiffd.log"));
        std::fs::create_dir_all(dir.join("instances/vm1")).unwrap();
        std::fs::write(dir.join("instances/vm1/console.log"), "the guest said this\n").unwrap();
        std::fs::write(&log, "skiffd said this\n").unwrap();
        // A process of the test's (found through SKIFF_DIR, as the CLI is).
        let mut child = Command::new("sleep").arg("60").env("SKIFF_DIR", &dir).spawn().unwrap();
        let places = Places { dir: dir.clone(), run: run.clone(), log: log.clone() };
        let r = report(&places);
        assert!(r.contains("skiffd said this") && r.contains("the guest said this"), "{r}");
        assert!(r.contains(&format!("pid {}: sleep 60", child.id())), "{r}");

        let dog = Watchdog::new(&dir, &run, &log);
        dog.step("quick", Duration::from_secs(60));
        dog.done();
        std::thread::sleep(Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "a step that ended in time killed the test's processes");
        dog.step("too long", Duration::from_millis(100));
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the watchdog did not end the step");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
