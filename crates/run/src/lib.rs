//! `skiff-run`: thin VMs from OCI runtime bundles without a daemon, in the
//! spirit of `runc run`. The library is what the daemon's VM driver will
//! reuse: find a kernel ([`kernel`]), build or reuse the initramfs
//! ([`initramfs`]), boot the VM with its rootfs over virtio-fs and wait for
//! the agent ([`vm::ThinVm`]), attach stdio to processes in it
//! ([`attach`]), and keep per-VM runtime directories ([`runtime`]) that
//! `list`, `exec` and `kill` find. [`monitor`] runs a VM detached, under a
//! small monitor process that outlives its caller (`skiff-run -d`, the
//! daemon's VM driver).

pub mod attach;
pub mod bundle;
pub mod control;
// Always built: the fuzz crate (crates/agent-proto/fuzz) calls it, and this
// crate has no `fuzzing` feature to gate it on.
#[doc(hidden)]
pub mod fuzzing;
pub mod initramfs;
pub mod kernel;
pub mod monitor;
pub mod runtime;
pub mod vm;

pub use bundle::Bundle;
pub use vm::{AgentEvents, Nic, Share, Stopped, ThinVm, VmError, VmExtras, VmOptions};
