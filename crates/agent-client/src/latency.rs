//! Exec round-trip measurement for the benchmarks (`bench/exec`): the same
//! loop and percentiles for every transport, so VM and container figures
//! compare.

use std::time::Instant;

use skiff_agent_proto::ExecRequest;

use crate::{AgentClient, ClientError};

/// Warm-up runs before measuring.
const WARM_UP: usize = 10;

/// Runs `true` `runs` times after [`WARM_UP`] warm-up runs; each round
/// trip in µs. A `true` that does not exit 0 is an error.
pub async fn exec_true(agent: &AgentClient, runs: usize) -> Result<Vec<f64>, ClientError> {
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + WARM_UP {
        let t = Instant::now();
        let o = agent.exec_output(req.clone(), None).await?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if o.status.code() != 0 {
            return Err(ClientError::Protocol(format!("true exited {:?}", o.status)));
        }
        if i >= WARM_UP {
            out.push(us);
        }
    }
    Ok(out)
}

/// The `p`th percentile (nearest rank) of `sorted`; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
