//! The sandbox the integration tests, the demo and the benchmarks run in:
//! three network namespaces on documentation address ranges.
//!
//! ```text
//!  client ns            proxy ns                     server ns
//!  c0 192.0.2.2 ---- p0 192.0.2.1 | p1 198.51.100.1 ---- s0 198.51.100.10
//!  2001:db8:1::2       2001:db8:1::1 | 2001:db8:2::1      2001:db8:2::10
//! ```
//!
//! The client and the server route through the proxy, which forwards.
//! Everything is removed when the [`Topology`] drops.

mod cgroup;
mod fixtures;
mod netns;
mod proxy;

pub use cgroup::*;
pub use fixtures::*;
pub use netns::*;
pub use proxy::*;

/// Retries `check` until it passes or `within` has gone by; the error is
/// the last failure's. Waits on what the test can observe, never a guess.
/// A [`Hopeless`] failure ends the wait at once.
pub fn eventually<T>(
    within: std::time::Duration,
    mut check: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if e.is::<Hopeless>() => return Err(e),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e.context(format!("not within {within:?}")));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// A failure [`eventually`] does not wait out: what it waits for can no
/// longer happen (the process exited, a request failed).
#[derive(Debug)]
pub struct Hopeless(pub String);

impl std::fmt::Display for Hopeless {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Hopeless {}
