//! The managed bridge: `Bridge::ensure` (create or adopt), taps, leases, supervision, teardown.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::cmd::{self, ip_json, is_not_found, run};
use crate::dnsmasq::{self, Settings};
use crate::ident::{self, bridge_mac, guest_mac, is_our_tap_name, nft_table, normalize_mac, tap_name};
use crate::subnet::{self, Ipv4Net};
use crate::{nft, NetError};

/// The file in the state directory that remembers the bridge's address (`10.118.3.1/24`).
const SUBNET_FILE: &str = "subnet";

/// What the daemon wants: one managed bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The bridge interface, e.g. `skiffbr0` (1-15 of `[A-Za-z0-9_-]`, not starting with `skt`).
    pub name: String,
    /// The gateway address and prefix (`10.0.5.1/24`); `None` picks a free `10.118.N.0/24` once and
    /// remembers it in `state_dir`.
    pub ipv4: Option<Ipv4Net>,
    /// Masquerade the subnet's traffic leaving through other interfaces.
    pub nat: bool,
    /// The DNS domain instances are reachable under (`NAME.skiff`).
    pub domain: String,
    /// Where the bridge keeps its files (subnet, dnsmasq conf, pid and leases).
    pub state_dir: PathBuf,
}

/// A tap device for one instance, a port of the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// The interface name (`skt` + 8 hex digits).
    pub name: String,
    /// The MAC the guest's NIC should use (`52:54:00:..`, stable for the instance id).
    pub mac: String,
}

#[derive(Debug)]
struct Inner {
    name: String,
    net: Ipv4Net,
    domain: String,
    state_dir: PathBuf,
    /// Serialises the dnsmasq operations of this handle (supervise, release, teardown).
    dnsmasq: Mutex<()>,
}

/// A handle on an ensured bridge; cheap to clone.
#[derive(Debug, Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

/// Undo actions of a call that failed half way, run in reverse order unless disarmed.
struct Undo(Vec<Box<dyn FnOnce()>>);

impl Undo {
    fn push(&mut self, f: impl FnOnce() + 'static) {
        self.0.push(Box::new(f));
    }

    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
}

/// What `ip -d addr show dev NAME` says about an interface.
#[derive(Debug)]
struct Link {
    kind: String,
    mac: String,
    ipv4: Vec<Ipv4Net>,
}

fn link(name: &str) -> Result<Option<Link>, NetError> {
    let v = match ip_json(&["-d", "addr", "show", "dev", name]) {
        Ok(v) => v,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(l) = v.as_array().and_then(|a| a.first()) else { return Ok(None) };
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Ok(Some(Link {
        kind: s(l.pointer("/linkinfo/info_kind")).unwrap_or_else(|| "device".into()),
        mac: s(l.get("address")).unwrap_or_default(),
        ipv4: subnet::nets_from_addrs(&v, ""),
    }))
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    run("ip", args).map(|_| ())
}

fn del_link(name: &str) -> Result<(), NetError> {
    match ip(&["link", "del", "dev", name]) {
        Err(e) if is_not_found(&e) => Ok(()),
        r => r,
    }
}

fn enable_ip_forward() -> Result<(), NetError> {
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    if fs::read_to_string(path).map(|s| s.trim() == "1").unwrap_or(false) {
        return Ok(());
    }
    fs::write(path, "1\n").map_err(|e| NetError::io("write", path, e))
}

/// Picks the bridge's address: the configured one, else the remembered one, else the address an
/// existing bridge already has, else a free /24. A remembered or adopted address that now clashes
/// with this namespace's routes is replaced by a free one; other namespaces only steer a fresh
/// choice (instances on the bridge may live there, with addresses in our subnet).
fn choose_net(cfg: &BridgeConfig, existing: Option<&Link>) -> Result<Ipv4Net, NetError> {
    let nets = subnet::host_nets(&cfg.name)?;
    let used = &nets.here;
    if let Some(net) = cfg.ipv4 {
        net.validate_for_bridge()?;
        if let Some(other) = subnet::clashes(&net, used) {
            return Err(NetError::InvalidConfig(format!("{net} overlaps {other}, already used on this host")));
        }
        return Ok(Ipv4Net { addr: net.gateway(), prefix: net.prefix });
    }
    let remembered = fs::read_to_string(cfg.state_dir.join(SUBNET_FILE)).ok().and_then(|s| s.trim().parse().ok());
    let adopted = existing.and_then(|l| l.ipv4.iter().find(|n| n.validate_for_bridge().is_ok()).copied());
    for net in [remembered, adopted].into_iter().flatten() {
        match subnet::clashes(&net, used) {
            None => return Ok(net),
            Some(other) => log::warn!("{}: {net} now overlaps {other}; choosing another subnet", cfg.name),
        }
    }
    let start = <sha2::Sha256 as sha2::Digest>::digest(cfg.name.as_bytes())[0];
    let all: Vec<Ipv4Net> = nets.here.iter().chain(&nets.other_namespaces).copied().collect();
    let net = subnet::choose_free(&all, start).ok_or(NetError::NoFreeSubnet)?;
    Ok(Ipv4Net { addr: net.gateway(), prefix: net.prefix })
}

impl Bridge {
    /// Creates or adopts the bridge and everything around it (address, forwarding, nftables table,
    /// dnsmasq). Idempotent; on failure, whatever this call made is removed again.
    pub fn ensure(cfg: &BridgeConfig) -> Result<Bridge, NetError> {
        ident::validate_bridge_name(&cfg.name)?;
        ident::validate_domain(&cfg.domain)?;
        // Everything the bridge needs, before anything is made.
        nft::check_available()?;
        run("dnsmasq", &["--version"])?;

        let mut undo = Undo(Vec::new());
        if !cfg.state_dir.exists() {
            fs::create_dir_all(&cfg.state_dir).map_err(|e| NetError::io("create", &cfg.state_dir, e))?;
            let dir = cfg.state_dir.clone();
            undo.push(move || {
                let _ = fs::remove_dir_all(&dir);
            });
        }

        let name = cfg.name.clone();
        let existing = link(&name)?;
        if let Some(l) = &existing {
            if l.kind != "bridge" {
                return Err(NetError::WrongInterfaceKind { name, kind: l.kind.clone(), expected: "bridge" });
            }
        }
        let net = choose_net(cfg, existing.as_ref())?;
        let mac = bridge_mac(&name);

        // The bridge itself, with a fixed MAC so it does not change as ports come and go.
        if existing.is_none() {
            ip(&["link", "add", "name", &name, "address", &mac, "type", "bridge", "forward_delay", "0"])?;
            let n = name.clone();
            undo.push(move || {
                let _ = del_link(&n);
            });
        } else if existing.as_ref().is_some_and(|l| l.mac != mac) {
            ip(&["link", "set", "dev", &name, "address", &mac])?;
        }

        // Exactly one IPv4 address: the gateway.
        let current = existing.as_ref().map(|l| l.ipv4.clone()).unwrap_or_default();
        for old in current.iter().filter(|a| **a != net) {
            ip(&["addr", "del", &old.to_string(), "dev", &name])?;
            let (n, a) = (name.clone(), old.to_string());
            undo.push(move || {
                let _ = ip(&["addr", "add", &a, "dev", &n]);
            });
        }
        if !current.contains(&net) {
            ip(&["addr", "add", &net.to_string(), "dev", &name])?;
            let (n, a) = (name.clone(), net.to_string());
            undo.push(move || {
                let _ = ip(&["addr", "del", &a, "dev", &n]);
            });
        }
        ip(&["link", "set", "dev", &name, "up"])?;
        enable_ip_forward()?;

        // The nftables table, replaced atomically; on failure the old copy comes back.
        let table = nft_table(&name);
        let old_table = if nft::exists(&table)? { Some(run("nft", &["list", "table", "inet", &table])?) } else { None };
        nft::apply(&table, &name, &net, cfg.nat)?;
        {
            let table = table.clone();
            undo.push(move || match old_table {
                Some(old) => {
                    let script = format!("delete table inet {table}\n{old}");
                    let _ = cmd::run_with_input("nft", &["-f", "-"], Some(&script));
                }
                None => {
                    let _ = nft::delete(&table);
                }
            });
        }

        // Remember the address; a new address invalidates the old leases.
        let subnet_path = cfg.state_dir.join(SUBNET_FILE);
        let remembered = fs::read_to_string(&subnet_path).ok();
        let subnet_changed = remembered.as_deref().map(str::trim) != Some(net.to_string().as_str());
        if subnet_changed {
            fs::write(&subnet_path, format!("{net}\n")).map_err(|e| NetError::io("write", &subnet_path, e))?;
            let p = subnet_path.clone();
            undo.push(move || {
                let _ = match remembered {
                    Some(text) => fs::write(&p, text),
                    None => fs::remove_file(&p),
                };
            });
        }

        // dnsmasq: kept when it runs with the same configuration, (re)started otherwise.
        let settings = Settings { bridge: &name, net, domain: &cfg.domain, state_dir: &cfg.state_dir };
        let conf_changed = dnsmasq::write_conf(&settings)?;
        let running = !dnsmasq::running(&cfg.state_dir).is_empty();
        if conf_changed || subnet_changed || !running {
            dnsmasq::stop(&cfg.state_dir);
            if subnet_changed {
                let _ = fs::remove_file(dnsmasq::lease_path(&cfg.state_dir));
            }
            dnsmasq::start(&cfg.state_dir)?;
        }

        undo.disarm();
        Ok(Bridge {
            inner: Arc::new(Inner {
                name,
                net,
                domain: cfg.domain.clone(),
                state_dir: cfg.state_dir.clone(),
                dnsmasq: Mutex::new(()),
            }),
        })
    }

    /// The bridge interface's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The bridge's own address, which instances use as router and DNS server.
    pub fn gateway(&self) -> Ipv4Addr {
        self.inner.net.addr
    }

    /// The subnet as (network address, prefix length).
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (self.inner.net.network(), self.inner.net.prefix)
    }

    /// The DNS domain.
    pub fn domain(&self) -> &str {
        &self.inner.domain
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.dnsmasq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pid of the dnsmasq serving this bridge, if one runs.
    pub fn dnsmasq_pid(&self) -> Option<u32> {
        dnsmasq::running(&self.inner.state_dir).first().copied()
    }

    /// Restarts dnsmasq if it is not running; returns whether it did. Call it every few seconds.
    pub fn supervise(&self) -> Result<bool, NetError> {
        let _g = self.lock();
        if !dnsmasq::running(&self.inner.state_dir).is_empty() {
            return Ok(false);
        }
        let settings = Settings {
            bridge: &self.inner.name,
            net: self.inner.net,
            domain: &self.inner.domain,
            state_dir: &self.inner.state_dir,
        };
        dnsmasq::write_conf(&settings)?;
        dnsmasq::start(&self.inner.state_dir)?;
        log::info!("{}: dnsmasq was not running; restarted", self.inner.name);
        Ok(true)
    }

    /// Creates (or adopts) the persistent tap of an instance, attached to the bridge and up.
    pub fn create_tap(&self, instance_id: &str) -> Result<Tap, NetError> {
        let tap = Tap { name: tap_name(instance_id), mac: guest_mac(instance_id) };
        let mut undo = Undo(Vec::new());
        match link(&tap.name)? {
            Some(l) if l.kind != "tun" => {
                return Err(NetError::WrongInterfaceKind { name: tap.name, kind: l.kind, expected: "tap" })
            }
            Some(_) => {}
            None => {
                ip(&["tuntap", "add", "dev", &tap.name, "mode", "tap"])?;
                let n = tap.name.clone();
                undo.push(move || {
                    let _ = del_link(&n);
                });
            }
        }
        ip(&["link", "set", "dev", &tap.name, "master", &self.inner.name, "up"])?;
        undo.disarm();
        Ok(tap)
    }

    /// Deletes a tap made by [`Bridge::create_tap`]; a missing tap is not an error.
    pub fn delete_tap(&self, tap_name: &str) -> Result<(), NetError> {
        if !is_our_tap_name(tap_name) {
            return Err(NetError::InvalidConfig(format!("`{tap_name}` is not a skiff tap name")));
        }
        del_link(tap_name)
    }

    /// The taps attached to this bridge that carry our name prefix.
    pub fn taps(&self) -> Result<Vec<String>, NetError> {
        let v = match ip_json(&["-d", "link", "show", "master", &self.inner.name]) {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|l| l.pointer("/linkinfo/info_kind").and_then(Value::as_str) == Some("tun"))
            .filter_map(|l| l.get("ifname").and_then(Value::as_str))
            .filter(|n| is_our_tap_name(n))
            .map(str::to_string)
            .collect())
    }

    /// Every unexpired lease in dnsmasq's lease file.
    pub fn leases(&self) -> Vec<dnsmasq::Lease> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        dnsmasq::read_leases(&self.inner.state_dir).into_iter().filter(|l| l.expiry == 0 || l.expiry > now).collect()
    }

    /// The address dnsmasq leased to `mac`, if any.
    pub fn lease(&self, mac: &str) -> Option<Ipv4Addr> {
        let mac = normalize_mac(mac);
        self.leases().into_iter().filter(|l| l.mac == mac).max_by_key(|l| l.expiry).map(|l| l.ip)
    }

    /// Forgets the lease of `mac`/`ip` in dnsmasq's memory and lease file: a DHCPRELEASE through
    /// `dhcp_release`, and if dnsmasq still holds it, dnsmasq is stopped, the line removed, and
    /// dnsmasq started again. Releasing an unknown lease is not an error.
    pub fn release(&self, mac: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        let _g = self.lock();
        let dir = &self.inner.state_dir;
        let mac = normalize_mac(mac);
        let held = |m: &str| dnsmasq::read_leases(dir).into_iter().find(|l| l.mac == m && l.ip == ip);
        let Some(lease) = held(&mac) else { return Ok(()) };
        if dnsmasq::running(dir).is_empty() {
            return dnsmasq::remove_from_lease_file(dir, &mac, ip);
        }
        let ip_s = ip.to_string();
        let mut args = vec![self.inner.name.as_str(), ip_s.as_str(), mac.as_str()];
        if let Some(cid) = &lease.client_id {
            args.push(cid);
        }
        match run("dhcp_release", &args) {
            Ok(_) => {
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    if held(&mac).is_none() {
                        return Ok(());
                    }
                    sleep(Duration::from_millis(20));
                }
            }
            Err(e) => log::warn!("{}: {e}; restarting dnsmasq instead", self.inner.name),
        }
        dnsmasq::stop(dir);
        dnsmasq::remove_from_lease_file(dir, &mac, ip)?;
        dnsmasq::start(dir)?;
        if held(&mac).is_some() {
            return Err(NetError::LeaseNotReleased { mac, ip });
        }
        Ok(())
    }

    /// Removes everything: our taps, dnsmasq, the nftables table, the bridge and the state
    /// directory. Every step is attempted; the first error is returned.
    pub fn teardown(&self) -> Result<(), NetError> {
        let _g = self.lock();
        teardown(&self.inner.name, &self.inner.state_dir)
    }
}

/// Removes a bridge network by name and state directory, without a handle (for a daemon that
/// deletes a network it could not ensure).
pub fn teardown(name: &str, state_dir: &Path) -> Result<(), NetError> {
    ident::validate_bridge_name(name)?;
    let mut first: Option<NetError> = None;
    let mut keep = |r: Result<(), NetError>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    dnsmasq::stop(state_dir);
    let taps = ip_json(&["-d", "link", "show", "master", name]).unwrap_or(Value::Null);
    for l in taps.as_array().into_iter().flatten() {
        let is_tun = l.pointer("/linkinfo/info_kind").and_then(Value::as_str) == Some("tun");
        if let Some(n) = l.get("ifname").and_then(Value::as_str).filter(|n| is_tun && is_our_tap_name(n)) {
            keep(del_link(n));
        }
    }
    keep(nft::delete(&nft_table(name)));
    match link(name) {
        Ok(Some(l)) if l.kind != "bridge" => {
            keep(Err(NetError::WrongInterfaceKind { name: name.to_string(), kind: l.kind, expected: "bridge" }))
        }
        Ok(Some(_)) => keep(del_link(name)),
        Ok(None) => {}
        Err(e) => keep(Err(e)),
    }
    match fs::remove_dir_all(state_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => keep(Err(NetError::io("remove", state_dir, e))),
        _ => {}
    }
    first.map_or(Ok(()), Err)
}
