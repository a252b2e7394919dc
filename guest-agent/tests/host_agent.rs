//! The real `skiff-agent` binary on the host, listening on a Unix socket
//! (not as PID 1), driven through `skiff-agent-client`. The behaviour
//! checks are the shared `conformance` ones, which the VM tests run too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skiff_agent_client::{
    conformance, AgentClient, ClientError, EventListener, Timeouts, Transport,
};
use skiff_agent_proto::{Event, ExitStatus, MainProcess, RestartPolicy, User};
use tempfile::TempDir;

/// A `skiff-agent` process serving a Unix socket in a temporary dir.
struct HostAgent {
    child: Child,
    dir: TempDir,
    client: AgentClient,
}

impl HostAgent {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    fn start_in(dir: TempDir, extra: &[&str]) -> Self {
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_skiff-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start skiff-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "agent socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = AgentClient::new(Transport::Unix(sock));
        HostAgent { child, dir, client }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_basics() {
    let a = HostAgent::start(&[]);
    let w = a.client.ping().await.expect("ping");
    assert!(!w.pid1);
    conformance::exec_uname(&a.client).await;
    conformance::exit_codes_and_signals(&a.client).await;
    conformance::env_cwd_and_streams(&a.client).await;
    conformance::stdin_round_trip(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tty_sees_resize() {
    let a = HostAgent::start(&[]);
    conformance::tty_resize(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_mib_of_stdout() {
    let a = HostAgent::start(&[]);
    conformance::big_stdout(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_execs() {
    let a = HostAgent::start(&[]);
    conformance::concurrent_execs(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_and_pull() {
    let a = HostAgent::start(&[]);
    let local = a.path("local");
    std::fs::create_dir(&local).expect("mkdir");
    let guest = a.path("guest");
    conformance::push_pull(&a.client, &local, guest.to_str().expect("utf-8")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_request_keeps_serving() {
    let a = HostAgent::start(&[]);
    conformance::unknown_request(&a.client).await;
}

fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(300),
        request: Duration::from_millis(300),
        exec: None,
    }
}

#[tokio::test]
async fn silent_agent_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Accepts and then never says a word.
    let sock = dir.path().join("silent.sock");
    let l = tokio::net::UnixListener::bind(&sock).expect("bind");
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let client = AgentClient::new(Transport::Unix(sock.clone())).with_timeouts(short_timeouts());
    let t = Instant::now();
    assert!(matches!(client.ping().await, Err(ClientError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(5));
    // Same behind a hybrid-vsock socket that never answers CONNECT.
    let client = AgentClient::new(Transport::vsock(&sock)).with_timeouts(short_timeouts());
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Transport(_))
    ));
    // A listener that never accepts: the handshake times out.
    let backlog = dir.path().join("backlog.sock");
    let _never = std::os::unix::net::UnixListener::bind(&backlog).expect("bind");
    let client = AgentClient::new(Transport::Unix(backlog)).with_timeouts(short_timeouts());
    assert!(matches!(client.ping().await, Err(ClientError::Timeout(_))));
}

fn write_config(dir: &Path, script: &str) -> PathBuf {
    let cfg = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", script], "cwd": "/", "env": ["PATH=/usr/bin:/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).expect("json")).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_process_exit_reaches_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events_path = dir.path().join("events.sock");
    let events = EventListener::bind(&events_path).expect("bind events");
    let config = write_config(dir.path(), "sleep 0.5; exit 7");
    let notify = format!("unix:{}", events_path.display());
    let a = HostAgent::start_in(
        dir,
        &[
            "--notify",
            &notify,
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    let mut stream = events
        .accept(Duration::from_secs(10))
        .await
        .expect("event connection");
    let first = stream.next(Duration::from_secs(10)).await.expect("event");
    assert!(matches!(first, Some(Event::Ready(_))), "{first:?}");
    assert_eq!(
        a.client.wait_main().await.expect("wait_main"),
        ExitStatus::Exited { code: 7 }
    );
    let second = stream.next(Duration::from_secs(10)).await.expect("event");
    assert_eq!(
        second,
        Some(Event::MainExited {
            status: ExitStatus::Exited { code: 7 },
            restarting: false
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_main_escalates_to_sigkill() {
    let a = HostAgent::start(&[]);
    let spec = |script: &str| MainProcess {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: "/".into(),
        user: User::default(),
        terminal: false,
        hostname: None,
        stop_signal: libc::SIGTERM,
        stop_timeout_secs: 1,
        restart: RestartPolicy::Never,
    };
    a.client
        .start_main(spec("exec sleep 60"))
        .await
        .expect("start main");
    let st = a
        .client
        .stop_main(Duration::from_secs(5))
        .await
        .expect("stop");
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: libc::SIGTERM
        }
    );
    a.client
        .start_main(spec("trap '' TERM; exec sleep 60"))
        .await
        .expect("start main again");
    let t = Instant::now();
    let st = a
        .client
        .stop_main(Duration::from_secs(1))
        .await
        .expect("stop");
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: libc::SIGKILL
        }
    );
    assert!(t.elapsed() >= Duration::from_secs(1));
}
