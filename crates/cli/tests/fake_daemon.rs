//! The `skiff` binary against a small fake skiffd on a temporary Unix
//! socket: the transport, the envelope (sync, async, error), operations and
//! `/wait`, the exec websockets (control first, stdin echoed back on
//! stdout, stderr, the exit code), and the "daemon not running" message.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// What the fake daemon saw.
#[derive(Default)]
struct Seen {
    /// "METHOD path" of each request, "ws:FD" of each websocket.
    log: Vec<String>,
    /// Request bodies by "METHOD path".
    bodies: BTreeMap<String, Value>,
}

struct Fake {
    seen: Arc<Mutex<Seen>>,
    stdin_tx: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    stdin_rx: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    outputs_done: watch::Sender<u32>,
    tty_done: watch::Sender<bool>,
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(s: &mut UnixStream) -> Option<Request> {
    // Byte by byte: nothing past the head may be consumed before a websocket upgrade.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(Request { method, path, headers, body })
}

async fn reply(s: &mut UnixStream, status: u16, v: &Value) {
    let body = v.to_string();
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn sync(metadata: Value) -> Value {
    json!({"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,"error":"","metadata":metadata})
}

fn op(id: &str, class: &str, status: u16, metadata: Value) -> Value {
    let name = if status == 200 { "Success" } else { "Running" };
    json!({"id": id, "class": class, "description": "x", "created_at": "2026-11-22T00:06:22Z",
        "updated_at": "2026-11-22T00:06:22Z", "status": name, "status_code": status,
        "resources": {"instances": ["/1.0/instances/web"]}, "metadata": metadata, "may_cancel": false, "err": "",
        "location": "none"})
}

fn async_op(id: &str, class: &str, metadata: Value) -> Value {
    json!({"type":"async","status":"Operation created","status_code":100,"operation":format!("/1.0/operations/{id}"),
        "error_code":0,"error":"","metadata":op(id, class, 103, metadata)})
}

fn instances() -> Value {
    json!([{"architecture":"x86_64","config":{},"created_at":"2026-11-22T00:06:16Z","name":"web","status":"Running",
        "status_code":103,"type":"virtual-machine","state":{"status":"Running","status_code":103,"network":{"eth0":{
        "addresses":[{"family":"inet","address":"10.118.0.5","netmask":"24","scope":"global"}]}}},
        "snapshots":[{"name":"s0","created_at":"2026-11-22T00:07:00Z"}]}])
}

async fn serve(fake: Arc<Fake>, mut s: UnixStream) {
    let Some(req) = read_request(&mut s).await else { return };
    let key = format!("{} {}", req.method, req.path);
    {
        let mut seen = fake.seen.lock().unwrap();
        if let Ok(v) = serde_json::from_slice::<Value>(&req.body) {
            seen.bodies.insert(key.clone(), v);
        }
        seen.log.push(key.clone());
    }
    let ws_secret = req.path.strip_prefix("/1.0/operations/").and_then(|p| p.split_once("/websocket?secret="));
    if let Some((_, secret)) = ws_secret {
        let accept = derive_accept_key(req.headers["sec-websocket-key"].as_bytes());
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
        fake.seen.lock().unwrap().log.push(format!("ws:{secret}"));
        return stream(fake, secret.to_string(), ws).await;
    }
    let (status, v) = match key.as_str() {
        "GET /1.0/instances?recursion=2" => (200, sync(instances())),
        "POST /1.0/instances" => (202, async_op("create1", "task", Value::Null)),
        "PUT /1.0/instances/web/state" => (202, async_op("start1", "task", Value::Null)),
        "POST /1.0/instances/web/exec" => {
            let fds = json!({"fds": {"0": "s0", "1": "s1", "2": "s2", "control": "sc"}});
            (202, async_op("exec1", "websocket", fds))
        }
        "POST /1.0/instances/tty/exec" => {
            (202, async_op("exec2", "websocket", json!({"fds": {"0": "t0", "control": "tc"}})))
        }
        "GET /1.0/operations/exec2/wait?timeout=30" => {
            let mut rx = fake.tty_done.subscribe();
            let _ = rx.wait_for(|d| *d).await;
            (200, sync(op("exec2", "websocket", 200, json!({"return": 0}))))
        }
        "GET /1.0/operations/create1/wait?timeout=30" | "GET /1.0/operations/start1/wait?timeout=30" => {
            (200, sync(op("x", "task", 200, Value::Null)))
        }
        "GET /1.0/operations/exec1/wait?timeout=30" => {
            let mut rx = fake.outputs_done.subscribe();
            let _ = rx.wait_for(|n| *n >= 2).await;
            (200, sync(op("exec1", "websocket", 200, json!({"return": 7}))))
        }
        _ => (
            404,
            json!({"type":"error","status":"","status_code":0,"operation":"","error_code":404,
            "error":"Instance not found","metadata":null}),
        ),
    };
    reply(&mut s, status, &v).await;
}

/// One exec stream: s0 reads stdin until the barrier, s1 echoes it, s2 says
/// what ran, sc records control messages.
async fn stream(fake: Arc<Fake>, secret: String, ws: WebSocketStream<UnixStream>) {
    let (mut sink, mut rx) = ws.split();
    match secret.as_str() {
        "s0" => {
            let tx = fake.stdin_tx.lock().unwrap().take().unwrap();
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    Message::Binary(b) => tx.send(b.to_vec()).await.unwrap(),
                    Message::Text(t) if t.is_empty() => {
                        fake.seen.lock().unwrap().log.push("stdin:barrier".into());
                        break;
                    }
                    _ => break,
                }
            }
        }
        "s1" => {
            let mut input = fake.stdin_rx.lock().unwrap().take().unwrap();
            while let Some(chunk) = input.recv().await {
                sink.send(Message::binary(chunk)).await.unwrap();
            }
            let _ = sink.close().await;
            fake.outputs_done.send_modify(|n| *n += 1);
        }
        "s2" => {
            sink.send(Message::binary(b"err:cat\n".to_vec())).await.unwrap();
            let _ = sink.close().await;
            fake.outputs_done.send_modify(|n| *n += 1);
        }
        "t0" => {
            // A PTY: what comes in goes back out on the same stream.
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    Message::Binary(b) => sink.send(Message::binary(b)).await.unwrap(),
                    _ => break,
                }
            }
            let _ = sink.close().await;
            fake.tty_done.send_replace(true);
        }
        _ => {
            while let Some(Ok(Message::Text(t))) = rx.next().await {
                fake.seen.lock().unwrap().log.push(format!("control:{t}"));
            }
        }
    }
}

/// Starts a fake daemon on `dir/unix.socket` in a thread of its own.
fn start(dir: &Path) -> (PathBuf, Arc<Mutex<Seen>>) {
    let sock = dir.join("unix.socket");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (tx, rx) = mpsc::channel(16);
    let fake = Arc::new(Fake {
        seen: seen.clone(),
        stdin_tx: Mutex::new(Some(tx)),
        stdin_rx: Mutex::new(Some(rx)),
        outputs_done: watch::channel(0).0,
        tty_done: watch::channel(false).0,
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = sock.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = UnixListener::bind(&path).unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(fake.clone(), s));
            }
        });
    });
    ready_rx.recv().unwrap();
    (sock, seen)
}

fn skiff(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("DOCKER_CONFIG", dir.join("docker"))
        .env_remove("SKIFF_SOCKET")
        .env_remove("SKIFF_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn list_info_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _) = start(dir.path());
    let s = sock.to_str().unwrap();
    let out = skiff(dir.path(), &["--socket", s, "list", "--format", "csv"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "web,RUNNING,10.118.0.5 (eth0),VIRTUAL-MACHINE,1\n");
    let out = skiff(dir.path(), &["--socket", s, "ls", "--format", "json"], b"");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, instances());
    let out = skiff(dir.path(), &["--socket", s, "info", "missing"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "Error: Failed to get \"missing\": Instance not found\n");
}

#[test]
fn exec_streams_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = start(dir.path());
    let args = ["--socket", sock.to_str().unwrap(), "exec", "web", "--env", "A=1", "--cwd", "/tmp", "--", "cat"];
    let out = skiff(dir.path(), &args, b"hello\nworld\n");
    assert_eq!(text(&out.stdout), "hello\nworld\n");
    assert_eq!(text(&out.stderr), "err:cat\n");
    assert_eq!(out.status.code(), Some(7));
    let seen = seen.lock().unwrap();
    let body = &seen.bodies["POST /1.0/instances/web/exec"];
    assert_eq!(body["command"], json!(["cat"]));
    assert_eq!(body["environment"], json!({"A": "1"}));
    assert_eq!((body["wait-for-websocket"].as_bool(), body["interactive"].as_bool()), (Some(true), Some(false)));
    assert_eq!(body["cwd"], "/tmp");
    let ws: Vec<&str> = seen.log.iter().filter(|l| l.starts_with("ws:")).map(String::as_str).collect();
    assert_eq!(ws, ["ws:sc", "ws:s0", "ws:s1", "ws:s2"], "control first, then 0, 1, 2");
    assert!(seen.log.iter().any(|l| l == "stdin:barrier"), "{:?}", seen.log);
}

#[test]
fn launch_maps_the_image_and_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = start(dir.path());
    let args = ["--socket", sock.to_str().unwrap(), "launch", "docker.io/library/nginx:1.27", "web", "-c", "a=b"];
    let out = skiff(dir.path(), &args, b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Creating web\nStarting web\n");
    let seen = seen.lock().unwrap();
    let body = &seen.bodies["POST /1.0/instances"];
    assert_eq!(body["source"], json!({"type": "image", "protocol": "oci", "alias": "docker.io/library/nginx:1.27"}));
    assert_eq!((body["name"].as_str(), &body["config"]), (Some("web"), &json!({"a": "b"})));
    assert_eq!(seen.bodies["PUT /1.0/instances/web/state"]["action"], "start");
}

#[test]
fn daemon_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("unix.socket");
    let out = skiff(dir.path(), &["--socket", sock.to_str().unwrap(), "list"], b"");
    assert_eq!(out.status.code(), Some(1));
    let want = format!(
        "Error: skiffd is not running (no socket at {}). Start it with \"systemctl start skiffd\", or run \"skiffd &\" \
         as root; see the README.\n",
        sock.display()
    );
    assert_eq!(text(&out.stderr), want);
    // SKIFF_DIR chooses the socket too.
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("list")
        .env("SKIFF_DIR", dir.path())
        .env_remove("SKIFF_SOCKET")
        .output()
        .unwrap();
    assert_eq!(text(&out.stderr), want);
}

#[test]
fn interactive_exec_and_resize() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = start(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["--socket", sock.to_str().unwrap(), "exec", "-t", "tty", "--", "sh"])
        .env("HOME", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logged = |what: &str| seen.lock().unwrap().log.iter().any(|l| l.contains(what));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Until the CLI has its SIGWINCH handler, the signal is ignored: repeat it.
    while !logged("window-resize") {
        assert!(std::time::Instant::now() < deadline, "no window-resize: {:?}", seen.lock().unwrap().log);
        if logged("ws:t0") {
            // SAFETY: kill only sends a signal to the child we spawned.
            unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hi\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!((text(&out.stdout).as_str(), out.status.code()), ("hi\n", Some(0)), "{}", text(&out.stderr));
    let seen = seen.lock().unwrap();
    let body = &seen.bodies["POST /1.0/instances/tty/exec"];
    assert_eq!(
        (body["interactive"].as_bool(), body["width"].as_u64(), body["height"].as_u64()),
        (Some(true), Some(80), Some(25))
    );
    let ws: Vec<&str> = seen.log.iter().filter(|l| l.starts_with("ws:")).map(String::as_str).collect();
    assert_eq!(ws, ["ws:tc", "ws:t0"]);
    let resize = seen.log.iter().find(|l| l.contains("window-resize")).unwrap();
    let msg: Value = serde_json::from_str(resize.trim_start_matches("control:")).unwrap();
    assert_eq!(msg, json!({"command": "window-resize", "args": {"width": "80", "height": "25"}}));
}
