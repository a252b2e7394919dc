//! The managed bridge on this host, for real: ensure, taps, idempotence, dnsmasq supervision, a
//! DHCP exchange from a network namespace (busybox udhcpc), DNS for the client's hostname,
//! release, teardown. Skips (with a printed reason) only when not root or when bridges cannot be
//! created here. Every name carries this process's id so a real `skiffbr0` is never touched.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use skiff_net::{Bridge, BridgeConfig};

fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_json(name: &str) -> Option<serde_json::Value> {
    let out = sh("ip", &["-j", "-d", "addr", "show", "dev", name]).ok()?;
    serde_json::from_str::<serde_json::Value>(&out).ok()?.as_array()?.first().cloned()
}

/// Why this host cannot run the test, if it cannot.
fn skip_reason(probe: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    match sh("ip", &["link", "add", probe, "type", "bridge"]) {
        Ok(_) => {
            let _ = sh("ip", &["link", "del", probe]);
            None
        }
        Err(e) => Some(format!("cannot create a bridge: {e}")),
    }
}

/// Removes what the test made outside the library, even when an assertion failed.
struct Cleanup {
    netns: String,
    veth: String,
    bridge: String,
    state_dir: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.veth]);
        let _ = sh("ip", &["netns", "del", &self.netns]);
        let _ = skiff_net::teardown(&self.bridge, &self.state_dir);
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
}

#[test]
fn managed_bridge_on_this_host() -> Result<()> {
    let id = std::process::id() % 100_000;
    let name = format!("skn{id}");
    if let Some(why) = skip_reason(&format!("sknprobe{id}")) {
        println!("SKIPPED managed_bridge_on_this_host: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let state_dir = tmp.path().join("networks").join(&name);
    let _cleanup = Cleanup {
        netns: format!("skn{id}"),
        veth: format!("skv{id}a"),
        bridge: name.clone(),
        state_dir: state_dir.clone(),
    };
    let cfg = BridgeConfig {
        name: name.clone(),
        ipv4: None,
        nat: true,
        domain: format!("sktest{id}"),
        state_dir: state_dir.clone(),
    };

    // Ensure: bridge with the gateway address, up; nft table; dnsmasq.
    let br = Bridge::ensure(&cfg)?;
    let (network, prefix) = br.subnet();
    let gw = br.gateway();
    println!("bridge {name}: gateway {gw}, subnet {network}/{prefix}");
    assert_eq!(prefix, 24);
    assert_eq!(u32::from(gw), u32::from(network) + 1);
    let l = link_json(&name).context("bridge missing")?;
    assert_eq!(l.pointer("/linkinfo/info_kind").and_then(|v| v.as_str()), Some("bridge"));
    let addrs: Vec<String> = l["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addrs, vec![format!("{gw}/24")]);
    assert!(l["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let table = sh("nft", &["list", "table", "inet", &format!("skiff_{name}")])?;
    assert!(table.contains("masquerade"), "{table}");
    assert!(table.contains(&format!("ip saddr {network}/24")), "{table}");
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?.trim(), "1");
    let dns_pid = br.dnsmasq_pid().context("dnsmasq not running")?;
    // Detached: its own session, not our child.
    let stat = std::fs::read_to_string(format!("/proc/{dns_pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    assert_ne!(fields[1].parse::<u32>()?, std::process::id(), "dnsmasq is our child");
    // SAFETY: getsid(0) has no preconditions.
    let our_sid = unsafe { libc::getsid(0) } as u32;
    assert_ne!(fields[3].parse::<u32>()?, our_sid, "dnsmasq shares our session");

    // Two taps, enslaved and up; idempotent.
    let t1 = br.create_tap(&format!("sktest-instance-a-{id}"))?;
    let t2 = br.create_tap(&format!("sktest-instance-b-{id}"))?;
    assert_ne!(t1.name, t2.name);
    assert_ne!(t1.mac, t2.mac);
    assert_eq!(br.create_tap(&format!("sktest-instance-a-{id}"))?, t1);
    for t in [&t1, &t2] {
        let l = link_json(&t.name).context("tap missing")?;
        assert_eq!(l["master"].as_str(), Some(name.as_str()), "{} not on the bridge", t.name);
        assert_eq!(l.pointer("/linkinfo/info_data/type").and_then(|v| v.as_str()), Some("tap"));
    }
    let mut taps = br.taps()?;
    taps.sort();
    let mut want = vec![t1.name.clone(), t2.name.clone()];
    want.sort();
    assert_eq!(taps, want);

    // Ensure again (a daemon restart): same subnet, same dnsmasq, taps kept.
    let again = Bridge::ensure(&cfg)?;
    assert_eq!(again.gateway(), gw);
    assert_eq!(again.dnsmasq_pid(), Some(dns_pid), "dnsmasq was restarted needlessly");
    assert_eq!(again.taps()?.len(), 2);
    assert!(!again.supervise()?);

    // dnsmasq killed: supervise restarts it, once.
    sh("kill", &["-9", &dns_pid.to_string()])?;
    for _ in 0..100 {
        if !process_alive(dns_pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(br.supervise()?, "supervise did not notice dnsmasq died");
    let new_pid = br.dnsmasq_pid().context("dnsmasq not restarted")?;
    assert_ne!(new_pid, dns_pid);
    assert!(!br.supervise()?);

    // A DHCP client in a namespace, on a veth into the bridge.
    let (ns, veth_host, veth_ns) = (format!("skn{id}"), format!("skv{id}a"), format!("skv{id}b"));
    let client_mac = "52:54:00:5e:00:42";
    sh("ip", &["netns", "add", &ns])?;
    sh("ip", &["link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns])?;
    sh("ip", &["link", "set", &veth_host, "master", &name, "up"])?;
    sh("ip", &["link", "set", &veth_ns, "netns", &ns])?;
    sh("ip", &["-n", &ns, "link", "set", &veth_ns, "address", client_mac, "up"])?;
    let udhcpc = sh(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "busybox",
            "udhcpc",
            "-i",
            &veth_ns,
            "-n",
            "-q",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            "/bin/true",
            "-x",
            "hostname:skclient",
        ],
    )?;
    println!("udhcpc: {}", udhcpc.trim());
    let leased = br.lease(client_mac).context("no lease for the client's MAC")?;
    println!("leased {leased}");
    assert_ne!(leased, gw);
    assert_eq!(u32::from(leased) & 0xffff_ff00, u32::from(network));
    assert_eq!(br.lease("52:54:00:AA:AA:AA"), None);

    // The client configures its address in its namespace: a later ensure keeps the subnet (an
    // instance's address in another namespace is not a clash).
    sh("ip", &["-n", &ns, "addr", "add", &format!("{leased}/24"), "dev", &veth_ns])?;
    let again = Bridge::ensure(&cfg)?;
    assert_eq!(again.gateway(), gw, "the subnet moved because a client uses it");
    assert_eq!(again.dnsmasq_pid(), Some(new_pid));
    sh("ip", &["netns", "exec", &ns, "busybox", "ping", "-c", "1", "-W", "2", &gw.to_string()])?;

    // DNS: the hostname the client sent resolves, bare and in the domain.
    for q in ["skclient".to_string(), format!("skclient.{}", cfg.domain)] {
        let out = sh("busybox", &["nslookup", &q, &gw.to_string()])?;
        assert!(out.contains(&leased.to_string()), "{q} did not resolve to {leased}: {out}");
    }

    // Release: gone from the lease file (and dnsmasq's memory: it rewrote the file).
    br.release(client_mac, leased)?;
    assert_eq!(br.lease(client_mac), None);
    assert_eq!(br.dnsmasq_pid(), Some(new_pid), "release restarted dnsmasq instead of a DHCPRELEASE");
    let text = std::fs::read_to_string(state_dir.join("dnsmasq.leases"))?;
    assert!(!text.contains(client_mac), "{text}");
    br.release(client_mac, leased)?; // unknown lease: fine
    let out = sh("busybox", &["nslookup", "skclient", &gw.to_string()]).unwrap_or_default();
    assert!(!out.contains(&leased.to_string()), "released name still resolves: {out}");
    sh("ip", &["link", "del", &veth_host])?;

    // Deleting a tap; twice is fine.
    br.delete_tap(&t2.name)?;
    br.delete_tap(&t2.name)?;
    assert_eq!(br.taps()?, vec![t1.name.clone()]);

    // Teardown leaves nothing.
    let pid = br.dnsmasq_pid().context("dnsmasq gone before teardown")?;
    br.teardown()?;
    assert!(link_json(&name).is_none(), "bridge left behind");
    assert!(link_json(&t1.name).is_none(), "tap left behind");
    let tables = sh("nft", &["list", "tables"])?;
    assert!(!tables.contains(&format!("skiff_{name}")), "nft table left behind: {tables}");
    assert!(!process_alive(pid), "dnsmasq left running");
    assert!(!state_dir.exists(), "state dir left behind");
    ensure!(br.teardown().is_ok(), "second teardown failed");
    Ok(())
}

/// A failure half way (here: the dnsmasq conf path is a directory, so writing it fails after the
/// bridge, its address and the nft table exist) leaves nothing behind; a configured subnet that
/// clashes with a host route is refused before anything is made.
#[test]
fn failed_ensure_undoes_its_work() -> Result<()> {
    let id = std::process::id() % 100_000;
    let name = format!("skn{id}u");
    if let Some(why) = skip_reason(&format!("sknprobe{id}u")) {
        println!("SKIPPED failed_ensure_undoes_its_work: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let state_dir = tmp.path().join(&name);
    let _cleanup = Cleanup {
        netns: format!("skn{id}u"),
        veth: format!("skv{id}u"),
        bridge: name.clone(),
        state_dir: state_dir.clone(),
    };
    std::fs::create_dir_all(state_dir.join("dnsmasq.conf"))?;
    let cfg = BridgeConfig { name: name.clone(), ipv4: None, nat: false, domain: "sku".into(), state_dir };
    let err = Bridge::ensure(&cfg).expect_err("ensure succeeded with an unwritable conf");
    println!("expected error: {err}");
    assert!(link_json(&name).is_none(), "bridge left behind after a failed ensure");
    assert!(!sh("nft", &["list", "tables"])?.contains(&format!("skiff_{name}")), "nft table left behind");
    assert!(!cfg.state_dir.join("subnet").exists(), "subnet remembered after a failed ensure");
    assert!(cfg.state_dir.exists(), "a state dir that existed before was removed");

    // A configured subnet on top of the host's default-route network is refused.
    let route = sh("ip", &["-4", "-j", "route"])?;
    let routes: serde_json::Value = serde_json::from_str(&route)?;
    let routes = routes.as_array().cloned().unwrap_or_default();
    let uplink = routes.iter().find(|r| r["dst"] == "default").and_then(|r| r["dev"].as_str()).unwrap_or("-");
    let host_net =
        routes.iter().filter(|r| r["dev"] == uplink).filter_map(|r| r["dst"].as_str()).find(|d| d.contains('/'));
    if let Some(dst) = host_net {
        let clash = BridgeConfig { ipv4: Some(dst.parse()?), ..cfg.clone() };
        let err = Bridge::ensure(&clash).expect_err("a clashing subnet was accepted");
        println!("expected error: {err}");
        assert!(err.to_string().contains("overlaps"), "{err}");
        assert!(link_json(&name).is_none());
    }
    Ok(())
}
