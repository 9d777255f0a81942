//! The `tproxy-user` command line: a thin layer over the library.

mod args;
mod commands;
mod config;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};
use tproxy_user::{
    attach,
    relay::{RelaySettings, TcpRelayConfig, UdpRelayConfig},
};
use tracing_subscriber::EnvFilter;

use crate::{
    args::{Cli, Command, DEFAULT_LOG_FILTER, OtherCommand},
    config::{attach_config, relay_configs, relay_settings},
};

/// What runs once the runtime is up; `attach` and `relay` are prepared
/// before it, while the process has a single thread.
enum Job {
    Attach(Box<attach::Prepared>),
    Relay(RelaySettings, TcpRelayConfig, UdpRelayConfig),
    Other(OtherCommand),
}

/// Checks the input, loads the programs, and drops every capability the
/// rest of the run does not need. Capabilities are per thread, so this
/// happens before the runtime starts its threads, which inherit the result.
fn prepare(command: Command) -> anyhow::Result<Job> {
    let job = match command {
        Command::Attach(args) => {
            let config = attach_config(*args)?;
            // Before anything is opened or loaded: the helper holds none of it.
            let successor = tproxy_user::upgrade::Successor::fork().context("attach")?;
            Job::Attach(Box::new(
                attach::prepare(config).context("attach")?.upgrade_with(successor),
            ))
        }
        Command::Relay(args) => {
            if args.listen_port == 0 {
                anyhow::bail!("give --listen-port: the port your TPROXY rules send traffic to");
            }
            let (tcp, udp) = relay_configs(&args)?;
            Job::Relay(relay_settings(&args)?, tcp, udp)
        }
        Command::Other(other) => return Ok(Job::Other(other)),
    };
    tproxy_user::host::system::drop_capabilities(
        &tproxy_user::host::system::runtime_capabilities(),
    )?;
    Ok(job)
}

async fn run(job: Job) -> anyhow::Result<()> {
    match job {
        Job::Attach(prepared) => prepared.run(shutdown_signal()?).await.context("attach"),
        Job::Relay(settings, tcp, udp) => {
            attach::relay_only(settings, tcp, udp, shutdown_signal()?).await.context("relay")
        }
        Job::Other(command) => commands::run_other(command).await,
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
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files
        // or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let job = match prepare(cli.command) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("tproxy-user: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tproxy-user: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(job)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tproxy-user: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
