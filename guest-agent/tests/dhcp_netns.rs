//! The agent's own DHCP client against a real dnsmasq, without a VM: a
//! network namespace holds one end of a veth pair (renamed `eth0`), the
//! host end runs dnsmasq, and the real `skiff-agent` binary serves in the
//! namespace (plus its own UTS and mount namespaces, with /etc/hostname,
//! /etc/hosts and /etc/resolv.conf bound to temporary files so the host's
//! are untouched). A `network` request with `dhcp` must configure the
//! address, route, MTU and resolv.conf, register the hostname in dnsmasq's
//! lease file, and keep renewing. Needs root; skipped otherwise.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skiff_agent_client::{AgentClient, Timeouts, Transport};
use skiff_agent_proto::{Addressing, NetworkConfig};
use tempfile::TempDir;

const HOSTNAME: &str = "skiff-dhcp-test";
/// Renewal time dnsmasq hands out (seconds), so the test sees renewals.
const T1: u64 = 3;

/// Runs a command; its stdout, or an error with its stderr.
fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent under test (`SKIFF_AGENT_BIN`: another build, e.g. the
/// static one from scripts/build-guest).
fn agent_bin() -> String {
    std::env::var("SKIFF_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_skiff-agent").into())
}

/// Why the test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces)".into());
    }
    for tool in ["ip", "dnsmasq", "unshare", "mount"] {
        if run(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// The namespace, the veth pair, dnsmasq and the agent; all removed on drop.
struct Bench {
    ns: String,
    host_if: String,
    /// The /24's first three octets.
    net: String,
    dir: TempDir,
    dnsmasq: Option<Child>,
    agent: Option<Child>,
}

impl Bench {
    fn new() -> Result<Self> {
        let pid = std::process::id();
        let mut b = Bench {
            ns: format!("skiff-dhcp-{pid}"),
            host_if: format!("sdh{pid}"),
            net: format!("10.213.{}", pid % 250),
            dir: tempfile::tempdir()?,
            dnsmasq: None,
            agent: None,
        };
        b.setup()?;
        Ok(b)
    }

    fn setup(&mut self) -> Result<()> {
        let (ns, hif, net) = (self.ns.clone(), self.host_if.clone(), self.net.clone());
        let peer = format!("sdg{}", std::process::id());
        run(&["ip", "netns", "add", &ns])?;
        run(&[
            "ip", "link", "add", &hif, "type", "veth", "peer", "name", &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", &ns])?;
        run(&["ip", "-n", &ns, "link", "set", &peer, "name", "eth0"])?;
        // A thin VM's kernel has rp_filter off; the host's may not, and
        // replies from a server the namespace has no route to would drop.
        for key in ["all", "default", "eth0"] {
            let k = format!("net.ipv4.conf.{key}.rp_filter=0");
            run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", &k])?;
        }
        run(&["ip", "addr", "add", &format!("{net}.1/24"), "dev", &hif])?;
        run(&["ip", "link", "set", &hif, "up"])?;

        let d = self.dir.path();
        let log = File::create(d.join("dnsmasq.log"))?;
        let dnsmasq = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--port=0",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                "--log-facility=-",
                &format!("--interface={hif}"),
                &format!("--dhcp-range={net}.100,{net}.150,255.255.255.0,120s"),
                &format!("--dhcp-leasefile={}", d.join("leases").display()),
                &format!("--pid-file={}", d.join("dnsmasq.pid").display()),
                &format!("--dhcp-option=option:dns-server,{net}.1"),
                "--dhcp-option=option:domain-name,skiff.test",
                "--dhcp-option=option:mtu,1400",
                &format!("--dhcp-option=option:T1,{T1}"),
                &format!("--dhcp-option=option:T2,{}", T1 * 3),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dnsmasq")?;
        self.dnsmasq = Some(dnsmasq);

        let etc = d.join("etc");
        std::fs::create_dir(&etc)?;
        for f in ["hostname", "hosts", "resolv.conf"] {
            std::fs::write(etc.join(f), "")?;
        }
        let sock = d.join("agent.sock");
        let script = r#"for f in hostname hosts resolv.conf; do
                mount --bind "$0/$f" "/etc/$f" || exit 1
            done
            exec "$1" --listen "unix:$2" --notify none"#;
        let agent = Command::new("ip")
            .args(["netns", "exec", &ns, "unshare", "--uts", "--mount"])
            .args(["--propagation", "private", "sh", "-c", script])
            .arg(&etc)
            .arg(agent_bin())
            .arg(&sock)
            .stdin(Stdio::null())
            .stderr(File::create(d.join("agent.log"))?)
            .spawn()
            .context("starting the agent")?;
        self.agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(st) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                bail!("agent exited: {st}: {}", self.read("agent.log"));
            }
            if Instant::now() > deadline {
                bail!("agent socket never appeared");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn client(&self) -> AgentClient {
        let sock = self.dir.path().join("agent.sock");
        AgentClient::new(Transport::Unix(sock)).with_timeouts(Timeouts {
            request: Duration::from_secs(45),
            ..Timeouts::default()
        })
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn in_ns(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.ns];
        all.extend_from_slice(args);
        run(&all).expect("ip in the namespace")
    }

    fn acks(&self) -> usize {
        self.read("dnsmasq.log").matches("DHCPACK(").count()
    }

    /// Waits until dnsmasq has sent `n` ACKs.
    fn wait_acks(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.acks() < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for child in [self.agent.take(), self.dnsmasq.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting the namespace deletes eth0 and with it the host end.
        let _ = run(&["ip", "netns", "del", &self.ns]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}

fn dhcp_config(dns: &[&str]) -> NetworkConfig {
    NetworkConfig {
        addressing: Addressing::Dhcp,
        hostname: Some(HOSTNAME.into()),
        dns: dns.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_from_dnsmasq_configures_eth0_and_renews() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping lease_from_dnsmasq_configures_eth0_and_renews: {why}");
        return;
    }
    let b = Bench::new().expect("namespace, veth, dnsmasq and agent");
    let net = b.net.clone();
    let client = b.client();
    let diag = |b: &Bench| {
        format!(
            "\n--- agent:\n{}\n--- dnsmasq:\n{}",
            b.read("agent.log"),
            b.read("dnsmasq.log")
        )
    };
    if let Err(e) = client.configure_network(dhcp_config(&[])).await {
        panic!("dhcp request: {e}{}", diag(&b));
    }

    // The range is .100 to .150.
    let addr = b.in_ns(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addr.contains(&format!("inet {net}.1")),
        "{addr}{}",
        diag(&b)
    );
    assert!(addr.contains("/24"), "{addr}");
    let route = b.in_ns(&["-4", "route", "show", "default"]);
    assert!(route.contains(&format!("via {net}.1 dev eth0")), "{route}");
    let link = b.in_ns(&["link", "show", "dev", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    let leases = b.read("leases");
    assert!(leases.contains(HOSTNAME), "lease file: {leases:?}");
    let resolv = b.read("etc/resolv.conf");
    assert!(
        resolv.contains(&format!("nameserver {net}.1\n")),
        "{resolv}"
    );
    assert!(resolv.contains("search skiff.test\n"), "{resolv}");
    assert_eq!(b.read("etc/hostname"), format!("{HOSTNAME}\n"));
    let log = b.read("agent.log");
    let line = format!("skiff-agent: eth0: DHCP lease {net}.1");
    assert!(log.contains(&line), "{log}");
    assert!(
        log.contains(&format!("/24 from {net}.1 for 120 s")),
        "{log}"
    );

    // The renewal thread extends the lease at T1.
    let first = b.acks();
    assert!(
        b.wait_acks(first + 1, Duration::from_secs(T1 + 10)),
        "no renewal{}",
        diag(&b)
    );

    // A second request replaces the first (the request's servers win)
    // and its renewer takes over: renewals go on, one per T1.
    client
        .configure_network(dhcp_config(&["192.0.2.53"]))
        .await
        .expect("second dhcp request");
    let resolv = b.read("etc/resolv.conf");
    assert!(resolv.contains("nameserver 192.0.2.53\n"), "{resolv}");
    assert!(!resolv.contains(&format!("{net}.1")), "{resolv}");
    let before = b.acks();
    let span = Duration::from_secs(T1 * 3 + 1);
    std::thread::sleep(span);
    let renewals = b.acks() - before;
    assert!(
        (1..=3).contains(&renewals),
        "{renewals} renewals in {span:?}{}",
        diag(&b)
    );
    eprintln!("{renewals} renewals in {span:?}{}", diag(&b));
}
