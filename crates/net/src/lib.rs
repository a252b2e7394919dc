//! Skiff's managed bridge network (like Incus's `incusbr0`): subnet choice, taps, dnsmasq (DHCP
//! and DNS) and nftables NAT, driven through the host's own tools (`ip -j`, `nft -f -`, `dnsmasq`,
//! `dhcp_release`).
//!
//! Everything is idempotent and reconciles with what exists on the host, so `skiffd` can be
//! killed and restarted at any time:
//!
//! ```text
//! Bridge::ensure(&BridgeConfig)      create or adopt: subnet (remembered in state_dir/subnet),
//!   -> Bridge                        bridge + gateway address, ip_forward, table inet skiff_<br>,
//!                                    dnsmasq (detached; found again by pid file + /proc cmdline)
//! bridge.supervise() -> bool         restart dnsmasq if it died (call every few seconds)
//! bridge.create_tap(id) -> Tap       persistent tap skt<8 hex>, on the bridge, up; guest MAC 52:54:00:..
//! bridge.delete_tap(name)            missing is fine
//! bridge.taps() -> Vec<String>       our taps on this bridge (for the daemon's reconcile)
//! bridge.lease(mac) -> Option<ip>    from dnsmasq's lease file
//! bridge.release(mac, ip)            DHCPRELEASE (dhcp_release), or stop/edit/start dnsmasq
//! bridge.teardown()                  taps, dnsmasq, nft table, bridge, state dir
//! ```
//!
//! State directory files: `subnet`, `dnsmasq.conf`, `dnsmasq.pid`, `dnsmasq.leases`.
//!
//! DNS: dnsmasq serves `domain`; an instance that sends its hostname in DHCP (option 12) resolves
//! as `NAME` and `NAME.<domain>`; `_gateway.<domain>` is the bridge. Other names go to the
//! servers of the host's `/etc/resolv.conf` (none is fine: local names still answer).
//!
//! Limits: calls for one bridge from several processes at once are not serialised (the daemon
//! owns its bridges); the forward accepts of our table cannot override a `drop` in another table
//! (e.g. Docker's iptables FORWARD policy); IPv4 only.

mod bridge;
mod cmd;
mod dnsmasq;
mod error;
pub mod ident;
mod nft;
mod subnet;

pub use bridge::{teardown, Bridge, BridgeConfig, Tap};
pub use dnsmasq::{parse_leases, Lease};
pub use error::NetError;
pub use subnet::Ipv4Net;
