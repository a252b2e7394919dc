//! The control API (`--api-socket PATH`): HTTP/1.1 with JSON bodies on a
//! Unix socket, as Firecracker's and Cloud Hypervisor's. The endpoints,
//! bodies and status codes are documented in the `skiff-vmm-client` crate,
//! whose types both sides use; `curl --unix-socket PATH
//! http://localhost/api/v1/vm.info` works.
//!
//! ```text
//!  connection thread ── parse (http.rs) ── route() ── VmRequest ──► channel + eventfd
//!                                                                      │
//!  main loop (vmm.rs, owns the VM) ◄───────────────────────────────────┘
//!      handles it, answers on the request's own reply channel ─► connection thread
//! ```
//!
//! Only the main loop touches the VM; connection threads parse and wait.

mod http;

use std::sync::mpsc::Sender;

use serde::Serialize;
use skiff_vmm_client::types::{DiskSpec, FsSpec, NetSpec, RemoveDevice, Resize, Snapshot, VsockSpec};

pub use http::{ApiServer, ApiServerError};

/// A request for the loop that owns the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmRequest {
    Ping,
    Info,
    Counters,
    Pause,
    Resume,
    Shutdown,
    PowerOff,
    AddDisk(DiskSpec),
    AddNet(NetSpec),
    AddFs(FsSpec),
    AddVsock(VsockSpec),
    RemoveDevice(String),
    Resize(Resize),
    Snapshot(Snapshot),
}

/// The answer to a request: an HTTP status and a JSON body (or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmReply {
    pub status: u16,
    pub body: Option<String>,
}

impl VmReply {
    /// 200 with `value` as the body.
    pub fn json(value: &impl Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self { status: 200, body: Some(body) },
            Err(e) => Self::error(500, format!("cannot encode the reply: {e}")),
        }
    }

    /// 204.
    pub fn done() -> Self {
        Self { status: 204, body: None }
    }

    /// An error with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::json!({ "error": message.into() }).to_string();
        Self { status, body: Some(body) }
    }
}

/// A request with the channel its answer goes back on.
pub struct ApiCall {
    pub request: VmRequest,
    pub reply: Sender<VmReply>,
}

fn body<T: serde::de::DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, VmReply> {
    serde_json::from_slice(body).map_err(|e| VmReply::error(400, format!("{endpoint}: bad body: {e}")))
}

/// Maps a method, path and body to a request, or the error reply.
pub fn route(method: &str, path: &str, raw: &[u8]) -> Result<VmRequest, VmReply> {
    let Some(endpoint) = path.strip_prefix("/api/v1/") else {
        return Err(VmReply::error(404, format!("unknown path {path}: endpoints are under /api/v1/")));
    };
    let endpoint = endpoint.split('?').next().unwrap_or(endpoint);
    let want = |m: &str| -> Result<(), VmReply> {
        if method == m {
            Ok(())
        } else {
            Err(VmReply::error(405, format!("{endpoint} takes {m}, not {method}")))
        }
    };
    let no_body = || -> Result<(), VmReply> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            Ok(())
        } else {
            Err(VmReply::error(400, format!("{endpoint} takes no body")))
        }
    };
    let req = match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => {
            want("GET")?;
            match endpoint {
                "vmm.ping" => VmRequest::Ping,
                "vm.info" => VmRequest::Info,
                _ => VmRequest::Counters,
            }
        }
        "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.power-off" => {
            want("PUT")?;
            no_body()?;
            match endpoint {
                "vm.pause" => VmRequest::Pause,
                "vm.resume" => VmRequest::Resume,
                "vm.shutdown" => VmRequest::Shutdown,
                _ => VmRequest::PowerOff,
            }
        }
        "vm.add-disk" => {
            want("PUT")?;
            VmRequest::AddDisk(body(endpoint, raw)?)
        }
        "vm.add-net" => {
            want("PUT")?;
            VmRequest::AddNet(body(endpoint, raw)?)
        }
        "vm.add-fs" => {
            want("PUT")?;
            VmRequest::AddFs(body(endpoint, raw)?)
        }
        "vm.add-vsock" => {
            want("PUT")?;
            VmRequest::AddVsock(body(endpoint, raw)?)
        }
        "vm.remove-device" => {
            want("PUT")?;
            VmRequest::RemoveDevice(body::<RemoveDevice>(endpoint, raw)?.id)
        }
        "vm.resize" => {
            want("PUT")?;
            VmRequest::Resize(body(endpoint, raw)?)
        }
        "vm.snapshot" => {
            want("PUT")?;
            VmRequest::Snapshot(body(endpoint, raw)?)
        }
        other => return Err(VmReply::error(404, format!("unknown endpoint {other}"))),
    };
    Ok(req)
}

/// Reads `bytes` as one connection's requests and routes each, as the
/// server does (without a VM to answer): the cargo-fuzz target `api`
/// (`vmm/fuzz`) and the tests call it. Returns the requests it routed.
#[doc(hidden)]
pub fn fuzz_requests(bytes: &[u8]) -> usize {
    let mut input = bytes;
    let mut buf = Vec::new();
    let mut routed = 0;
    // Each request consumes input, so this ends; the bound is a backstop.
    for _ in 0..bytes.len() + 1 {
        match http::read_request(&mut input, &mut buf) {
            http::Incoming::Request(r) => {
                assert!(r.body.len() <= http::MAX_BODY, "a body over the limit was accepted");
                if let Ok(req) = route(&r.method, &r.path, &r.body) {
                    let _ = format!("{req:?}");
                    routed += 1;
                }
                let mut out = Vec::new();
                http::write_reply(&mut out, &VmReply::done(), r.close).expect("writing to a Vec");
            }
            http::Incoming::Closed => break,
            http::Incoming::Bad(reply) => {
                assert!(reply.status >= 400);
                break;
            }
        }
    }
    routed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds: valid requests of every endpoint, and broken ones.
    const SEEDS: &[&[u8]] = &[
        b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 37\r\n\r\n{\"path\":\"/x.raw\",\"serial\":\"s\",\"id\":\"d\"}",
        b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 26\r\n\r\n{\"vcpus\":4,\"memory_mib\":9}",
        b"PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{\"id\":1}",
        b"PUT /api/v1/vm.pause HTTP/1.0\r\n\r\nGET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.add-net HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ];

    #[test]
    fn fuzz_entry_survives_seeds_and_mutations() {
        assert!(fuzz_requests(SEEDS[0]) == 1 && fuzz_requests(SEEDS[4]) == 2);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in SEEDS {
            fuzz_requests(seed);
            for _ in 0..300 {
                let mut m = seed.to_vec();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % (m.len() + 1);
                    match next() % 3 {
                        0 if at < m.len() => m[at] = next() as u8,
                        1 => m.insert(at, next() as u8),
                        _ if at < m.len() => {
                            m.remove(at);
                        }
                        _ => {}
                    }
                }
                fuzz_requests(&m);
            }
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/api/v1/vm.info", b""), Ok(VmRequest::Info));
        assert_eq!(route("PUT", "/api/v1/vm.pause", b""), Ok(VmRequest::Pause));
        assert_eq!(
            route("PUT", "/api/v1/vm.remove-device", br#"{"id":"d1"}"#),
            Ok(VmRequest::RemoveDevice("d1".into()))
        );
        let disk = route("PUT", "/api/v1/vm.add-disk", br#"{"path":"/x.img","readonly":true}"#).unwrap();
        assert!(matches!(disk, VmRequest::AddDisk(d) if d.readonly && d.id.is_none()));
        assert_eq!(
            route("PUT", "/api/v1/vm.snapshot", br#"{"destination":"/s"}"#),
            Ok(VmRequest::Snapshot(Snapshot { destination: "/s".into() }))
        );
        assert_eq!(route("PUT", "/api/v1/vm.snapshot", br#"{}"#).unwrap_err().status, 400);
        let cases: [(&str, &str, &[u8], u16); 7] = [
            ("PUT", "/api/v1/vm.info", b"", 405),
            ("GET", "/api/v1/vm.pause", b"", 405),
            ("PUT", "/api/v1/vm.pause", b"{}", 400),
            ("PUT", "/api/v1/vm.add-disk", br#"{"path":"/x","bogus":1}"#, 400),
            ("PUT", "/api/v1/vm.resize", b"not json", 400),
            ("GET", "/api/v1/vm.dance", b"", 404),
            ("GET", "/v2/vm.info", b"", 404),
        ];
        for (m, p, b, status) in cases {
            let err = route(m, p, b).unwrap_err();
            assert_eq!(err.status, status, "{m} {p}");
            assert!(err.body.unwrap().contains("\"error\""));
        }
    }
}
