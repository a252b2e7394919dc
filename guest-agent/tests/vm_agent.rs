//! The same checks as `host_agent.rs`, against an agent running as PID 1
//! of a real guest. Ignored by default: `scripts/vm-smoke` boots the guest
//! and runs this with `--ignored` and `SKIFF_AGENT_VM` set to
//! `vsock:CID:PORT`, `hybrid:UDS:PORT` or `unix:PATH`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use skiff_agent_client::{conformance, AgentClient, Transport};
use skiff_agent_proto::{ExecRequest, MountRequest, NetworkConfig, PowerAction, UnmountRequest};

fn transport() -> Transport {
    let spec = std::env::var("SKIFF_AGENT_VM").expect("SKIFF_AGENT_VM names the guest's agent");
    let parts: Vec<&str> = spec.splitn(3, ':').collect();
    match parts.as_slice() {
        ["vsock", cid, port] => Transport::Vsock {
            cid: cid.parse().expect("cid"),
            port: port.parse().expect("port"),
        },
        ["hybrid", uds, port] => Transport::HybridVsock {
            path: PathBuf::from(uds),
            port: port.parse().expect("port"),
        },
        ["unix", path] => Transport::Unix(PathBuf::from(path)),
        _ => panic!("bad SKIFF_AGENT_VM {spec:?}"),
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

async fn stdout_of(agent: &AgentClient, script: &str) -> String {
    let out = agent.exec_output(sh(script), None).await.expect("exec");
    assert_eq!(
        out.status.code(),
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One boot, many checks, then a clean power-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a guest: run by guest-agent/scripts/vm-smoke"]
async fn agent_as_pid1_in_a_vm() {
    let agent = AgentClient::new(transport());
    let deadline = Instant::now() + Duration::from_secs(300);
    let welcome = loop {
        match agent.ping().await {
            Ok(w) => break w,
            Err(e) if Instant::now() < deadline => {
                let mut msg = e.to_string();
                let mut cur = std::error::Error::source(&e);
                while let Some(c) = cur {
                    msg = format!("{msg}: {c}");
                    cur = c.source();
                }
                eprintln!("waiting for the agent: {msg}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => panic!("agent never answered: {e}"),
        }
    };
    assert!(welcome.pid1, "the agent is init");
    let t = Instant::now();
    agent.ping().await.expect("ping");
    eprintln!("ping round trip: {:?}", t.elapsed());

    conformance::exec_uname(&agent).await;
    conformance::exit_codes_and_signals(&agent).await;
    conformance::env_cwd_and_streams(&agent).await;
    conformance::identity(&agent).await;
    conformance::stdin_round_trip(&agent).await;
    conformance::tty_resize(&agent).await;
    conformance::concurrent_execs(&agent).await;
    conformance::unknown_request(&agent).await;
    let t = Instant::now();
    conformance::big_stdout(&agent).await;
    eprintln!("100 MiB of stdout: {:?}", t.elapsed());
    let local = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    conformance::push_pull(&agent, local.path(), "/tmp/pushed").await;
    eprintln!("push and pull of 50 MiB: {:?}", t.elapsed());

    // The init sequence: early mounts and the modules it loaded.
    let mounts = stdout_of(&agent, "cat /proc/mounts").await;
    for m in [
        " /proc proc",
        " /sys sysfs",
        " /dev devtmpfs",
        " /dev/pts devpts",
        " /run tmpfs",
    ] {
        assert!(mounts.contains(m), "{m} missing from {mounts}");
    }
    let modules = stdout_of(&agent, "cat /proc/modules").await;
    assert!(modules.contains("vmw_vsock_virtio_transport "), "{modules}");

    // Mount and unmount at run time.
    let req = MountRequest {
        source: "scratch".into(),
        target: "/mnt/scratch".into(),
        fstype: "tmpfs".into(),
        options: vec!["nosuid".into(), "size=8m".into()],
    };
    agent.mount(req).await.expect("mount");
    assert!(stdout_of(&agent, "cat /proc/mounts")
        .await
        .contains("scratch /mnt/scratch tmpfs rw,nosuid"));
    agent
        .unmount(UnmountRequest {
            target: "/mnt/scratch".into(),
            lazy: false,
        })
        .await
        .expect("unmount");
    assert!(!stdout_of(&agent, "cat /proc/mounts")
        .await
        .contains("/mnt/scratch"));

    // Names.
    let cfg = NetworkConfig {
        hostname: Some("skiff-smoke".into()),
        dns: vec!["10.0.2.3".into()],
        ..Default::default()
    };
    agent.configure_network(cfg).await.expect("network");
    assert_eq!(stdout_of(&agent, "hostname").await.trim(), "skiff-smoke");
    assert!(stdout_of(&agent, "cat /etc/resolv.conf")
        .await
        .contains("nameserver 10.0.2.3"));
    assert!(stdout_of(&agent, "cat /etc/hosts")
        .await
        .contains("127.0.1.1\tskiff-smoke"));

    agent.power(PowerAction::Poweroff).await.expect("power off");
}
