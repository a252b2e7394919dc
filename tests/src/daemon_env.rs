//! The harness of the daemon's end-to-end tests: a skiffd on a scratch
//! directory driven through the `skiff` CLI, and small helpers (HTTP GET
//! with retries, commands that must succeed, process counts).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// A skiffd under test and the `skiff` CLI pointed at it.
pub struct Env {
    /// State directory (`--dir`).
    pub dir: PathBuf,
    /// Runtime directory (`--run-dir`).
    pub run: PathBuf,
    /// Where skiffd and skiff are.
    pub bin: PathBuf,
    /// `HOME` of the CLI (its remotes).
    pub home: PathBuf,
    /// The running skiffd.
    pub daemon: Option<Child>,
    /// skiffd's log.
    pub log: PathBuf,
}

impl Env {
    /// A skiffd (not started yet) for state under `tmp` (`skiff/`, `run/`,
    /// `home/`, `skiffd.log`), with the binaries in `bin`.
    pub fn in_scratch(tmp: &std::path::Path, bin: PathBuf) -> Result<Env> {
        let env = Env {
            dir: tmp.join("skiff"),
            run: tmp.join("run"),
            bin,
            home: tmp.join("home"),
            daemon: None,
            log: tmp.join("skiffd.log"),
        };
        std::fs::create_dir_all(&env.home)?;
        Ok(env)
    }

    /// Builds the demo image into this daemon's store
    /// (`scripts/build-demo-image`); its OCI layout directory.
    pub fn demo_image(&self) -> Result<PathBuf> {
        let layout = run(Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-demo-image"))
            .env("SKIFF_DIR", &self.dir)
            .env("SKIFF_OCI", self.bin.join("skiff-oci")))?;
        Ok(PathBuf::from(layout.trim()))
    }

    /// `skiff ARGS`: exit code, stdout, stderr.
    pub fn skiff(&self, args: &[&str]) -> Result<(i32, String, String)> {
        self.skiff_in(args, None)
    }

    /// `skiff ARGS` on a pseudo-terminal (through `script`, ended after
    /// `limit_secs`), its stdin, stdout and stderr piped: for `console`
    /// and interactive `exec`.
    pub fn skiff_on_pty(&self, args: &str, limit_secs: u32) -> Result<std::process::Child> {
        let cmd = format!("{} {args}", self.bin.join("skiff").display());
        Ok(Command::new("timeout")
            .args([&limit_secs.to_string(), "script", "-qec", &cmd, "/dev/null"])
            .env("SKIFF_DIR", &self.dir)
            .env("HOME", &self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// `skiff ARGS` with `stdin`.
    pub fn skiff_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<(i32, String, String)> {
        let mut child = Command::new(self.bin.join("skiff"))
            .args(args)
            .env("SKIFF_DIR", &self.dir)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running skiff")?;
        if let Some(data) = stdin {
            child.stdin.take().context("stdin")?.write_all(data)?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `skiff ARGS` that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.skiff(args)?;
        ensure!(code == 0, "skiff {} exited {code}: {err}{out}", args.join(" "));
        Ok(out)
    }

    /// Starts skiffd and waits for its socket.
    pub fn start_daemon(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(self.bin.join("skiffd"))
            .arg("--dir")
            .arg(&self.dir)
            .arg("--run-dir")
            .arg(&self.run)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting skiffd")?;
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.dir.join("unix.socket")).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.daemon.as_mut() {
                if let Some(s) = c.try_wait()? {
                    bail!("skiffd exited {s}:\n{}", self.daemon_log());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("skiffd did not open its socket within 60 s:\n{}", self.daemon_log())
    }

    /// Kills skiffd (SIGKILL).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The end of skiffd's log.
    pub fn daemon_log(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// `skiff ARGS` that must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.skiff(args)?;
        ensure!(code != 0, "skiff {} succeeded: {out}", args.join(" "));
        Ok(err)
    }

    /// `skiff exec NAME -- sh -c SCRIPT`: exit code and stdout (stderr
    /// shown when it failed).
    pub fn sh(&self, name: &str, script: &str) -> Result<(i32, String)> {
        let (code, out, err) = self.skiff(&["exec", name, "--", "sh", "-c", script])?;
        if code != 0 && !err.is_empty() {
            eprintln!("exec {script:?} in {name} exited {code}: {err}");
        }
        Ok((code, out))
    }

    /// The images skiffd lists (`skiff image list --format json`).
    pub fn images(&self) -> Result<Vec<Value>> {
        let v: Value = serde_json::from_str(&self.ok(&["image", "list", "--format", "json"])?)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The image store's work directory holds nothing.
    pub fn store_tmp_empty(&self) -> Result<()> {
        let tmp = self.dir.join("oci/tmp");
        let left: Vec<_> = std::fs::read_dir(&tmp).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        ensure!(left.is_empty(), "left in {}: {left:?}", tmp.display());
        Ok(())
    }

    /// The instance's IPv4 address from `skiff list --format json`.
    pub fn ipv4(&self, name: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.ok(&["list", "--format", "json"])?;
            let v: Value = serde_json::from_str(&out).context("list --format json")?;
            let addr = v.as_array().into_iter().flatten().find(|i| i["name"] == name).and_then(|i| {
                i.pointer("/state/network/eth0/addresses")?
                    .as_array()?
                    .iter()
                    .find(|a| a["family"] == "inet")
                    .and_then(|a| a["address"].as_str().map(str::to_string))
            });
            if let Some(a) = addr {
                return Ok(a);
            }
            ensure!(Instant::now() < deadline, "{name} has no IPv4 address after 60 s: {out}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Best effort: stop every instance so no VM outlives the test.
        if self.daemon.is_some() {
            if let Ok((_, out, _)) = self.skiff(&["list", "--format", "csv"]) {
                for line in out.lines() {
                    if let Some(name) = line.split(',').next().filter(|n| !n.is_empty()) {
                        let _ = self.skiff(&["delete", "--force", name]);
                    }
                }
            }
        }
        self.kill_daemon();
        // skiffd leaves its bridge's dnsmasq running for the next skiffd to
        // adopt; a test's is the last, and the next test's skiffd on this
        // host could not bind the bridge address while it runs.
        let mine = self.dir.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.starts_with("dnsmasq") && cmd.contains(&mine) {
                if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                    // SAFETY: kill has no memory effects; pid is the dnsmasq of this test's skiffd.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
    }
}

/// Where skiffd and skiff are: `SKIFF_BIN`, else the running test
/// binary's target directory (`target/<profile>/deps/<test>` →
/// `target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SKIFF_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(std::path::Path::parent).context("test binary directory")?.to_path_buf();
    ensure!(dir.join("skiffd").is_file(), "no skiffd in {}: cargo build --release -p skiffd -p skiff", dir.display());
    Ok(dir)
}

/// GET / of `addr:port`, retried for 30 s; the whole response.
pub fn http_get(addr: &str, port: u16) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> Result<String> {
            let mut s = TcpStream::connect_timeout(&format!("{addr}:{port}").parse()?, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(b) => return Ok(b),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("GET http://{addr}:{port}/"))),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many processes named `name` run.
pub fn processes(name: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_to_string(e.path().join("comm")).map(|c| c.trim() == name).unwrap_or(false))
                .count()
        })
        .unwrap_or(0)
}

/// Debian's `lxc` client (`tests/clients/lxc-client.sh`) against the
/// skiffd of `dir`: `name` must run, `other` is stopped, started and
/// deleted by it.
pub fn lxc_client(dir: &std::path::Path, name: &str, other: &str) -> Result<()> {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/lxc-client.sh"))
        .args([name, other])
        .env("SKIFF_DIR", dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("lxc client:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "{text}");
    Ok(())
}

/// pylxd (`tests/clients/pylxd-client.py`, in the venv scripts/setup
/// makes) against the skiffd of `dir`, on the running instance `name`.
pub fn pylxd(dir: &std::path::Path, name: &str) -> Result<()> {
    let venv = std::env::var("SKIFF_VENV").unwrap_or_else(|_| "/var/lib/skiff/venv".into());
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/pylxd-client.py"))
        .arg(dir.join("unix.socket"))
        .arg(name)
        .output()
        .context("the pylxd venv (scripts/setup makes it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("pylxd:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "{text}");
    Ok(())
}
