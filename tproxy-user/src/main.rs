//! The `tproxy-user` command line: a thin layer over the library.

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tproxy_user::{
    attach::{self, AttachConfig},
    intercept::{
        self, DEFAULT_MARK, DEFAULT_RULE_PRIORITY, DEFAULT_TABLE, DEFAULT_UPSTREAM_MARK,
        InterceptConfig,
    },
    relay::TcpRelayConfig,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tproxy-user",
    version,
    about = "Transparent proxying with eBPF instead of iptables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Intercept TCP ports arriving on interfaces and relay each connection to
    /// its original destination. Runs until SIGINT or SIGTERM, then removes
    /// everything it added.
    Attach(AttachArgs),
    /// Remove what a killed `attach` left behind: TC filters on the given
    /// interfaces and the policy routing for the mark and table.
    Cleanup(CleanupArgs),
}

#[derive(Args)]
struct RoutingArgs {
    /// Mark put on steered packets (decimal or 0x hex).
    #[arg(long, default_value_t = DEFAULT_MARK, value_parser = parse_u32)]
    mark: u32,
    /// Routing table that delivers marked packets locally.
    #[arg(long, default_value_t = DEFAULT_TABLE, value_parser = clap::value_parser!(u32).range(1..=u32::MAX as i64))]
    table: u32,
    /// Priority of the `fwmark → table` rule.
    #[arg(long, default_value_t = DEFAULT_RULE_PRIORITY)]
    rule_priority: u32,
}

#[derive(Args)]
struct AttachArgs {
    /// Interfaces to intercept on (TC ingress).
    #[arg(required = true, value_name = "IFACE")]
    interfaces: Vec<String>,
    /// TCP destination port to intercept (repeatable).
    #[arg(long = "port", short = 'p', required = true, value_parser = clap::value_parser!(u16).range(1..))]
    ports: Vec<u16>,
    /// Port of the relay's transparent listener; 0 lets the kernel choose.
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    #[command(flatten)]
    routing: RoutingArgs,
    /// SO_MARK of the relay's upstream connections, which are never steered.
    #[arg(long, default_value_t = DEFAULT_UPSTREAM_MARK, value_parser = parse_u32)]
    upstream_mark: u32,
    /// Seconds to wait for the original destination to accept.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
}

#[derive(Args)]
struct CleanupArgs {
    /// Interfaces an earlier `attach` ran on.
    #[arg(value_name = "IFACE")]
    interfaces: Vec<String>,
    #[command(flatten)]
    routing: RoutingArgs,
}

const DEFAULT_LOG_FILTER: &str = "info,aya::bpf=error";

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}

fn intercept_config(
    interfaces: Vec<String>,
    ports: Vec<u16>,
    routing: &RoutingArgs,
) -> InterceptConfig {
    InterceptConfig {
        mark: routing.mark,
        table: routing.table,
        rule_priority: routing.rule_priority,
        ..InterceptConfig::new(interfaces, ports)
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Attach(args) => {
            if !(args.connect_timeout.is_finite() && args.connect_timeout > 0.0) {
                anyhow::bail!("--connect-timeout must be a positive number of seconds");
            }
            let mut intercept = intercept_config(args.interfaces, args.ports, &args.routing);
            intercept.bypass_mark = args.upstream_mark;
            let config = AttachConfig {
                intercept,
                relay: TcpRelayConfig {
                    listen_port: args.listen_port,
                    ipv6: tproxy_user::system::ipv6_enabled(),
                    upstream_mark: args.upstream_mark,
                    connect_timeout: Duration::from_secs_f64(args.connect_timeout),
                },
            };
            attach::run(config, shutdown_signal()?).await.context("attach")
        }
        Command::Cleanup(args) => {
            tproxy_user::system::check_privileges()?;
            for iface in &args.interfaces {
                tproxy_user::system::ifindex(iface)?;
            }
            let config = intercept_config(args.interfaces, vec![], &args.routing);
            intercept::remove_leftovers(&config).await.context("cleanup")?;
            tracing::info!("removed leftovers for mark {:#x}, table {}", config.mark, config.table);
            Ok(())
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // aya-log-ebpf 0.2 emits a BTF union name (`MaybeUninit<u8>`) that
    // bpf-linker 0.10 leaves unsanitized, so the kernel rejects the object's
    // BTF and aya loads the program without it. Nothing here needs BTF
    // (legacy maps, no CO-RE), so that warning is noise by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tproxy-user: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tproxy-user: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
