//! The thin-VM stress run (not part of `tests/run`; `tests/stress` runs it
//! in the KVM box): `skiff-thin-stress [ROUNDS] [--execs N] [--mib M]`
//! boots a fresh thin VM per round, runs one round of
//! `skiff_tests::thin::agent_round` (conformance checks with a main process
//! alive, a burst of N concurrent execs streaming M MiB each), and prints
//! each failed round's checks with the VMM's log and the console's tail,
//! then the pass rate. `--qemu` runs the same rounds under QEMU (microvm,
//! vhost-vsock, vhost-user-fs) to tell the VMM's faults from the host's.
//! Exit status 0 only when every round passed.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use skiff_tests::scratch;
use skiff_tests::thin::{agent_round, RoundOptions};

fn main() -> Result<()> {
    let mut rounds = 20usize;
    let mut opts = RoundOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next().with_context(|| format!("{name} needs a value"))?.parse().with_context(|| name.to_string())
        };
        match a.as_str() {
            "--execs" => opts.burst_execs = value("--execs")?,
            "--mib" => opts.burst_bytes = value("--mib")? << 20,
            "--qemu" => opts.qemu = true,
            "--gib-stdin" => opts.gib_stdin = true,
            "--cpus" => opts.cpus = u8::try_from(value("--cpus")?).context("--cpus")?,
            "-h" | "--help" => {
                println!("usage: skiff-thin-stress [ROUNDS] [--execs N] [--mib M] [--cpus N] [--qemu] [--gib-stdin]");
                return Ok(());
            }
            n => rounds = n.parse().with_context(|| format!("unknown argument {n}"))?,
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
    let dir = scratch()?;
    let mut passed = 0;
    let start = Instant::now();
    for r in 1..=rounds {
        let t = Instant::now();
        eprintln!("=== round {r}/{rounds}");
        match rt.block_on(agent_round(dir.path(), &opts)) {
            Ok(res) if res.failures.is_empty() => {
                passed += 1;
                eprintln!("=== round {r}: PASS ({:.0?})", t.elapsed());
            }
            Ok(res) => {
                eprintln!("=== round {r}: FAIL ({:.0?})\n{}\n{}", t.elapsed(), res.failures.join("\n"), res.diagnostics)
            }
            Err(e) => eprintln!("=== round {r}: FAIL ({:.0?}): {e:#}", t.elapsed()),
        }
    }
    println!(
        "thin-VM stress{}: {passed}/{rounds} rounds passed ({} execs x {} MiB burst, {} vCPUs) in {:.0?}",
        if opts.qemu { " under QEMU" } else { "" },
        opts.burst_execs,
        opts.burst_bytes >> 20,
        opts.cpus,
        start.elapsed()
    );
    if passed != rounds {
        bail!("{} of {rounds} rounds failed", rounds - passed);
    }
    Ok(())
}
