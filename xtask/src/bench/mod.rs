//! `cargo xtask bench`: tproxy against the real alternatives, each at its
//! best and in its common configuration, in the namespace sandbox, with
//! rounds interleaved and medians reported.
//!
//! - `steering`: how each mode is set up (the servers, HAProxy, nginx,
//!   the iptables recipe, tproxy);
//! - `measure`: what is measured (iperf3, ApacheBench, a UDP lockstep load,
//!   idle memory);
//! - `report`: the tables, the targets and the chart in BENCHMARKS.md;
//! - `profile`: the flame graph and the system calls per connection;
//! - `upgrade`: failed requests while the proxy is replaced under load.

mod measure;
mod profile;
mod report;
mod steering;
mod upgrade;

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::Topology;

use steering::{Servers, Steering};

/// The ways through the proxy namespace.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Mode {
    /// No proxy: the namespace only forwards. The limit.
    Direct,
    /// HAProxy as the README-style recipe has it: the plain `-m socket`
    /// rule, no forced splice. What people copy.
    HaproxyRecipe,
    /// HAProxy at its best: forced splice, `-m socket ! --syn`.
    Haproxy,
    /// HAProxy at its best, connecting from the client's address
    /// (`usesrc clientip`).
    HaproxySpoof,
    /// `tproxy-user attach`.
    Ours,
    /// `tproxy-user attach --spoof-source`.
    OursSpoof,
    /// nginx's UDP proxy behind an iptables REDIRECT: the UDP rival.
    NginxUdp,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Direct,
        Mode::HaproxyRecipe,
        Mode::Haproxy,
        Mode::HaproxySpoof,
        Mode::Ours,
        Mode::OursSpoof,
        Mode::NginxUdp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::HaproxyRecipe => "haproxy-recipe",
            Mode::Haproxy => "haproxy",
            Mode::HaproxySpoof => "haproxy-spoof",
            Mode::Ours => "ours",
            Mode::OursSpoof => "ours-spoof",
            Mode::NginxUdp => "nginx-udp",
        }
    }

    fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name).with_context(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mode {name:?} (modes: {})", names.join(", "))
        })
    }

    /// Whether the mode takes part in `metric`: HAProxy relays no UDP,
    /// nginx-udp only UDP, and `direct` has no relay to weigh.
    pub fn measures(self, metric: Metric) -> bool {
        match self {
            Mode::Direct => !matches!(metric, Metric::IdleMemory | Metric::ConnCpu),
            Mode::HaproxyRecipe | Mode::Haproxy | Mode::HaproxySpoof => metric != Metric::UdpRate,
            Mode::NginxUdp => metric == Metric::UdpRate,
            Mode::Ours | Mode::OursSpoof => true,
        }
    }

    /// What a ratio in `metric`'s row compares the mode with: the limit
    /// for throughput, HAProxy at its best (in the same spoofing mode) for
    /// connections, latency and memory.
    pub fn anchor(self, metric: Metric) -> Mode {
        match metric {
            Metric::Throughput1 | Metric::Throughput4 | Metric::UdpRate => Mode::Direct,
            _ if self.spoofs() => Mode::HaproxySpoof,
            _ => Mode::Haproxy,
        }
    }

    fn spoofs(self) -> bool {
        matches!(self, Mode::HaproxySpoof | Mode::OursSpoof)
    }
}

/// What is measured, in the order of the table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Metric {
    Throughput1,
    Throughput4,
    ConnRate,
    LatencyP50,
    LatencyP99,
    /// The relay's own CPU time (user and system, its threads and worker
    /// processes) per connection under the connection-rate load.
    ConnCpu,
    UdpRate,
    IdleMemory,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Throughput1,
        Metric::Throughput4,
        Metric::ConnRate,
        Metric::LatencyP50,
        Metric::LatencyP99,
        Metric::ConnCpu,
        Metric::UdpRate,
        Metric::IdleMemory,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Throughput1 => "TCP throughput, 1 stream (Gbit/s)",
            Metric::Throughput4 => "TCP throughput, 4 streams (Gbit/s)",
            Metric::ConnRate => "HTTP, a new connection per request (req/s)",
            Metric::LatencyP50 => "HTTP latency p50, connect included (ms)",
            Metric::LatencyP99 => "HTTP latency p99, connect included (ms)",
            Metric::ConnCpu => "relay CPU per connection (µs)",
            Metric::UdpRate => "UDP request/response (per s)",
            Metric::IdleMemory => "relay RSS per idle connection (KiB)",
        }
    }
}

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Only the upgrade-under-load comparison.
    pub upgrade_only: bool,
    /// Only these modes (names); BENCHMARKS.md is rewritten only by a run
    /// of all of them.
    pub modes: Vec<String>,
    /// The binary is not the workspace's build: nothing is written.
    pub other_build: bool,
}

/// Medians' raw material: every round's value of each metric and mode.
pub type Results = BTreeMap<(Metric, Mode), Vec<f64>>;

pub fn run(bin: &Path, options: &Options) -> Result<()> {
    ensure!(options.rounds >= 1, "at least one round");
    let modes: Vec<Mode> = if options.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        options.modes.iter().map(|m| Mode::parse(m)).collect::<Result<_>>()?
    };
    let complete = modes.len() == Mode::ALL.len() && !options.other_build;
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("TPROXY_USER_BIN", bin) };
    let workspace = super::workspace();
    let work = workspace.join("target/bench");
    fs::create_dir_all(&work)?;
    let topology = Topology::new("bench")?;
    let servers = Servers::start(&topology, &work)?;
    let path = workspace.join("BENCHMARKS.md");
    if options.upgrade_only || complete {
        let upgrades = upgrade::rounds(&topology, &work, options)?;
        println!("{upgrades}");
        if !options.other_build {
            report::write_section(&path, report::UPGRADE, &upgrades)?;
        }
        if options.upgrade_only {
            if !options.other_build {
                eprintln!("bench: upgrade results written to {}", path.display());
            }
            return Ok(());
        }
    }
    let mut results = Results::new();
    for round in 1..=options.rounds {
        for &mode in &modes {
            eprintln!("bench: round {round}/{}: {}", options.rounds, mode.name());
            let steering = Steering::start(&topology, mode, &work)?;
            let measured = measure::all(&topology, &steering, options.seconds, &work);
            drop(steering);
            for (metric, value) in measured {
                results.entry((metric, mode)).or_default().push(value);
            }
        }
    }
    let table = report::render(&results, options);
    println!("{table}");
    // A partial run (trying a change) keeps its figures out of the docs.
    let figures = if complete { workspace.join(report::FIGURES) } else { work.clone() };
    let profile = if modes.contains(&Mode::Ours) {
        eprintln!("bench: profiling the relay under the connection-rate load");
        let profile = profile::run(&topology, &work, &figures)?;
        println!("{profile}");
        profile
    } else {
        String::new()
    };
    drop(servers);
    if !complete {
        eprintln!("bench: not every mode ran, or not this build; BENCHMARKS.md left as it was");
        return Ok(());
    }
    report::chart(&results, &figures.join(report::CHART))?;
    report::write_section(&path, report::RESULTS, &format!("{table}\n{profile}"))?;
    eprintln!("bench: results written to {}", path.display());
    Ok(())
}
