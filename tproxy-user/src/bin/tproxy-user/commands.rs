//! The commands that talk to a running instance or print something, and
//! `doctor` and `cleanup`.

use anyhow::Context as _;
use tproxy_user::{
    control::{self, Request, Response},
    intercept,
};

use crate::{
    args::{Cli, OtherCommand, PortAction, RuleAction},
    config::intercept_config,
};

/// Sends `request` to instance `name`; a refusal becomes the error.
async fn ask(name: &str, request: Request) -> anyhow::Result<Response> {
    tproxy_user::instance::validate_name(name)?;
    match control::request(name, &request).await? {
        Response::Error { message } => Err(anyhow::anyhow!(message)),
        response => Ok(response),
    }
}

async fn print_rules(name: &str) -> anyhow::Result<()> {
    if let Response::Rules { rules } = ask(name, Request::ListRules).await? {
        for rule in rules {
            println!("{rule}");
        }
    }
    Ok(())
}

pub(crate) async fn run_other(command: OtherCommand) -> anyhow::Result<()> {
    match command {
        OtherCommand::Port { action } => match action {
            PortAction::Add(a) => {
                ask(&a.instance.name, Request::AddRule { rule: a.rule() }).await.map(drop)
            }
            PortAction::Del(a) => {
                ask(&a.instance.name, Request::DeleteRule { rule: a.rule() }).await.map(drop)
            }
            PortAction::List(i) => print_rules(&i.name).await,
        },
        OtherCommand::Rule { action } => match action {
            RuleAction::Add(a) => {
                ask(&a.instance.name, Request::AddRule { rule: a.rule.to_string() }).await.map(drop)
            }
            RuleAction::Del(a) => {
                ask(&a.instance.name, Request::DeleteRule { rule: a.rule.to_string() })
                    .await
                    .map(drop)
            }
            RuleAction::List(i) => print_rules(&i.name).await,
        },
        OtherCommand::Reload(i) => ask(&i.name, Request::Reload).await.map(drop),
        OtherCommand::Stats { instance, json, all } => {
            if let Response::Stats { stats } = ask(&instance.name, Request::Stats).await? {
                if json {
                    println!("{}", serde_json::to_string_pretty(&stats)?);
                } else {
                    print!("{}", stats.to_table(all));
                }
            }
            Ok(())
        }
        OtherCommand::Doctor(args) => {
            let config = intercept_config(args.interfaces, vec![], &args.routing);
            let findings = tproxy_user::doctor::check(&config).await;
            for finding in &findings {
                println!("{finding}");
            }
            if tproxy_user::doctor::failed(&findings) {
                anyhow::bail!("doctor found problems (FAIL above)");
            }
            Ok(())
        }
        OtherCommand::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tproxy-user",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        OtherCommand::Man { dir } => {
            use clap::CommandFactory as _;
            let command = Cli::command();
            match dir {
                Some(dir) => clap_mangen::generate_to(command, &dir)
                    .with_context(|| format!("writing man pages into {}", dir.display())),
                None => clap_mangen::Man::new(command)
                    .render(&mut std::io::stdout())
                    .context("writing the man page"),
            }
        }
        OtherCommand::Cleanup(args) => {
            tproxy_user::host::system::check_privileges()?;
            for iface in &args.interfaces {
                tproxy_user::host::system::ifindex(iface)?;
            }
            intercept::remove_leftovers(&args.instance.name, &args.interfaces)
                .await
                .context("cleanup")?;
            tracing::info!("removed what instance {:?} left behind", args.instance.name);
            Ok(())
        }
    }
}
