//! skiff-vmm's control API: its wire types ([`types`]) and a blocking
//! client ([`Client`]). skiff-vmm serves the API on the Unix socket given
//! with `--api-socket PATH`; skiff-run, the daemon's VM driver and
//! `skiff-vmm-ctl` use this crate to drive a running VM.
//!
//! # Protocol
//!
//! HTTP/1.1 over the Unix socket, JSON bodies, as Firecracker's and Cloud
//! Hypervisor's APIs (`curl --unix-socket PATH http://localhost/api/v1/vm.info`
//! works). Every request is answered; errors have a JSON body
//! `{"error": "what and why"}` ([`types::ErrorBody`]).
//!
//! | request                        | body               | reply                         |
//! |--------------------------------|--------------------|-------------------------------|
//! | `GET /api/v1/vmm.ping`         |                    | 200 [`types::Ping`]           |
//! | `GET /api/v1/vm.info`          |                    | 200 [`types::VmInfo`]         |
//! | `GET /api/v1/vm.counters`      |                    | 200 [`types::Counters`]       |
//! | `PUT /api/v1/vm.pause`         |                    | 204 once every vCPU is parked |
//! | `PUT /api/v1/vm.resume`        |                    | 204                           |
//! | `PUT /api/v1/vm.shutdown`      |                    | 204; the ACPI power button is pressed |
//! | `PUT /api/v1/vm.power-off`     |                    | 204; the VMM ends (status 0)  |
//! | `PUT /api/v1/vm.add-disk`      | [`types::DiskSpec`]  | 200 [`types::DeviceAdded`]  |
//! | `PUT /api/v1/vm.add-net`       | [`types::NetSpec`]   | 200 [`types::DeviceAdded`]  |
//! | `PUT /api/v1/vm.add-fs`        | [`types::FsSpec`]    | 200 [`types::DeviceAdded`]  |
//! | `PUT /api/v1/vm.add-vsock`     | [`types::VsockSpec`] | 200 [`types::DeviceAdded`]  |
//! | `PUT /api/v1/vm.remove-device` | [`types::RemoveDevice`] | 204 once the guest ejected it |
//! | `PUT /api/v1/vm.resize`        | [`types::Resize`]    | 204                         |
//! | `PUT /api/v1/vm.snapshot`      | [`types::Snapshot`]  | 200 [`types::SnapshotSaved`]; the VM must be paused |
//!
//! Status codes: 400 a malformed request or body (unknown fields are
//! refused), 404 an unknown endpoint or device id, 405 a wrong method,
//! 409 a request the VM's state refuses (a duplicate device id, no free
//! slot, a resize beyond `max`, adding while paused), 413 a body over
//! 64 KiB, 500 a host failure, 503 too many connections, 504 the guest did
//! not answer in time (a device it never ejects). Pause and resume are
//! idempotent.

pub mod client;
pub mod types;

pub use client::{Client, ClientError};
