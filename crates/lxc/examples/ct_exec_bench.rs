//! Exec round trip of `true` into an LXC container two ways, interleaved
//! in one run: through Skiff's agent (the container's init, over its Unix
//! socket: what `skiff exec` uses) and through `lxc-attach` (what LXC
//! offers). The container is the one the LXC driver would make (its config
//! from `skiff_lxc::conf`), privileged, with a busybox rootfs and no NIC.
//! Driven by `bench/exec`.
//!
//!   ct_exec_bench --runs N [--agent PATH]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_agent_client::latency::{exec_true, percentile};
use skiff_agent_client::{AgentClient, EventListener, Transport};
use skiff_lxc::conf::{self, Cgroups, Init, Limits, Spec};
use skiff_lxc::tools::Lxc;

fn make_rootfs(root: &Path) -> Result<()> {
    for d in ["bin", "dev", "proc", "sys", "run", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
    for applet in ["sh", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(())
}

/// `lxc-attach -- true`, `runs` times after 10 warm-up runs; µs each.
fn attach_true(lxc: &Lxc, name: &str, runs: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + 10 {
        let t = Instant::now();
        let o = Command::new("lxc-attach")
            .arg("-n")
            .arg(name)
            .arg("-P")
            .arg(lxc.path())
            .args(["--clear-env", "--", "/bin/true"])
            .stdin(Stdio::null())
            .output()?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        ensure!(o.status.success(), "lxc-attach: {}: {}", o.status, String::from_utf8_lossy(&o.stderr));
        if i >= 10 {
            out.push(us);
        }
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut runs = 300usize;
    let mut agent_path: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--agent" => agent_path = Some(it.next().context("--agent PATH")?.into()),
            "-h" | "--help" => {
                println!("ct_exec_bench --runs N [--agent PATH]: exec into an LXC container, agent vs lxc-attach");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let agent_bin = std::fs::canonicalize(skiff_run::initramfs::find_agent(agent_path.as_deref())?)?;
    let tmp = tempfile::Builder::new().prefix("skiff-ct-bench-").tempdir()?;
    let dir = tmp.path();
    make_rootfs(&dir.join("rootfs"))?;
    let sockets = dir.join("sock");
    std::fs::create_dir_all(&sockets)?;
    let listener = EventListener::bind(&sockets.join(conf::EVENT_SOCKET))?;
    let name = format!("skiff-bench-{}", std::process::id());
    let spec = Spec {
        name: name.clone(),
        rootfs: dir.join("rootfs"),
        idmap: None,
        nic: None,
        limits: Limits::default(),
        agent: agent_bin,
        sockets: sockets.clone(),
        mounts: vec![],
        init: Init::Agent,
        console_log: dir.join("console.log"),
        cgroups: Cgroups::detect(),
    };
    let lxc = Lxc::new(dir.join("lxc"));
    std::fs::create_dir_all(lxc.dir(&name))?;
    std::fs::write(lxc.dir(&name).join("config"), conf::render(&spec)?)?;
    lxc.start(&name).await.with_context(|| {
        let read = |f: &str| std::fs::read_to_string(lxc.dir(&name).join(f)).unwrap_or_default();
        format!("config:\n{}\nlog:\n{}", read("config"), read("lxc.log"))
    })?;
    let result = async {
        let mut events = listener.accept(Duration::from_secs(60)).await?;
        events.next(Duration::from_secs(60)).await?;
        let agent = AgentClient::new(Transport::Unix(sockets.join(conf::AGENT_SOCKET)));
        let (mut via_agent, mut via_attach) = (Vec::new(), Vec::new());
        // Interleaved in chunks, so drift in the machine hits both alike.
        let chunk = 50.min(runs.max(1));
        let mut left = runs;
        while left > 0 {
            let n = chunk.min(left);
            via_agent.extend(exec_true(&agent, n).await?);
            via_attach.extend(attach_true(&lxc, &name, n)?);
            left -= n;
        }
        anyhow::Ok((via_agent, via_attach))
    }
    .await;
    let _ = lxc.stop(&name, Duration::ZERO, true).await;
    let (mut a, mut b) = result?;
    for v in [&mut a, &mut b] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    println!("\n{:<28} {:>8} {:>12} {:>12}", "container exec", "execs", "p50 (µs)", "p99 (µs)");
    for (label, v) in [("skiff agent (unix socket)", &a), ("lxc-attach", &b)] {
        println!("{:<28} {:>8} {:>12.0} {:>12.0}", label, v.len(), percentile(v, 50.0), percentile(v, 99.0));
    }
    println!(
        "ratio agent/lxc-attach: p50 {:.2}, p99 {:.2}",
        percentile(&a, 50.0) / percentile(&b, 50.0),
        percentile(&a, 99.0) / percentile(&b, 99.0)
    );
    Ok(())
}
