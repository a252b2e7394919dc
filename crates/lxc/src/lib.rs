//! Native containers through LXC, behind the daemon's instance-driver
//! trait ([`skiff_driver::Driver`]): `skiff launch IMAGE` without `--vm`.
//!
//! A container's rootfs is the same copy-on-write volume a thin VM gets
//! (skiff-storage), mounted with the image layer id-mapped for an
//! unprivileged container. Skiff's agent runs in every container, so exec,
//! files, network set-up and the main process work exactly as in a VM:
//!
//! - an **OCI application container** has the agent as its init
//!   (`skiff-agent --container`): it reaps, runs the image's entrypoint
//!   with its env, cwd, user and restart policy, reports its exit, and ends
//!   the container when it ends for good;
//! - a **system container** boots its own init; the agent is started
//!   beside it once it runs (`lxc-attach`, `skiff-agent --daemon`).
//!
//! The agent listens on a Unix socket in a host directory bind-mounted at
//! `/.skiff/sock` and sends its events to another one there. LXC's own
//! monitor keeps each container, so containers outlive the daemon; the
//! driver watches the container's init through a pidfd and re-attaches
//! after a daemon restart.
//!
//! ```text
//! start: volume.mount_mapped → events socket → LXC config → lxc-start -d
//!        → agent ready (OCI: its event; system: lxc-attach, then ping)
//!        → DHCP on eth0 through the agent → main process (OCI) → watcher
//! stop:  OCI: the agent stops the main process (stop signal, timeout,
//!        SIGKILL) and powers off; system: lxc-stop -t (SIGRTMIN+3);
//!        force or no end in time: lxc-stop -k → volume.unmount
//! ```

pub mod conf;
mod driver;
pub mod nsmount;
pub mod tools;

pub use driver::{LxcDriver, LxcDriverConfig, DEFAULT_IDMAP};
