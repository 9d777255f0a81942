//! The rules file (`attach --config FILE`), re-read on SIGHUP and by
//! `tproxy-user reload`.
//!
//! ```toml
//! # Rules in the command line's text form...
//! rules = ["tcp/80", "udp/53 from 10.0.0.0/8", "80 to 198.51.100.5 exclude"]
//!
//! # ...or as tables; both may be used together.
//! [[rule]]
//! ports = "8000-8099"          # or a number
//! protocols = ["tcp"]          # default: tcp and udp
//! to = "203.0.113.0/24"        # default: every destination
//! from = "10.0.0.0/8"          # default: every source
//! via = "corp"                 # default: the default upstream, if any
//! action = "intercept"         # or "exclude"
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    rules::{Action, Protocol, Rule},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    rule: Vec<RuleTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    ports: Ports,
    protocols: Option<Vec<Protocol>>,
    to: Option<String>,
    from: Option<String>,
    via: Option<String>,
    action: Option<Action>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ports {
    One(u32),
    Text(String),
}

impl RuleTable {
    /// The same rule in the text form, so that one parser validates both.
    fn to_text(&self) -> String {
        let mut text = String::new();
        if let Some(protocols) = &self.protocols {
            let names: Vec<String> = protocols.iter().map(|p| p.to_string()).collect();
            text += &format!("{}/", names.join(","));
        }
        match &self.ports {
            Ports::One(port) => text += &port.to_string(),
            Ports::Text(ports) => text += ports,
        }
        if let Some(to) = &self.to {
            text += &format!(" to {to}");
        }
        if let Some(from) = &self.from {
            text += &format!(" from {from}");
        }
        if let Some(via) = &self.via {
            text += &format!(" via {via}");
        }
        if self.action == Some(Action::Exclude) {
            text += " exclude";
        }
        text
    }
}

/// Parses rules from a file's contents; `origin` names it in errors.
pub fn parse_rules(origin: &str, contents: &str) -> Result<Vec<Rule>> {
    let file: File = toml::from_str(contents)
        .map_err(|e| Error::Config(format!("{origin}: {}", one_line(&e.to_string()))))?;
    let texts = file.rules.iter().cloned().chain(file.rule.iter().map(RuleTable::to_text));
    texts
        .map(|text| text.parse::<Rule>().map_err(|e| Error::Config(format!("{origin}: {e}"))))
        .collect()
}

/// Reads and parses the rules file at `path`.
pub fn load_rules(path: &Path) -> Result<Vec<Rule>> {
    load_rules_and_contents(path).map(|(rules, _)| rules)
}

/// [`load_rules`], with the contents they came from (for a watch that must
/// know what was applied).
pub fn load_rules_and_contents(path: &Path) -> Result<(Vec<Rule>, Vec<u8>)> {
    let contents = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let rules = parse_rules(&path.display().to_string(), &contents)?;
    Ok((rules, contents.into_bytes()))
}

/// toml's messages span several lines (with a caret under the error); ours
/// are one line.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|'));
    let head = lines.next().unwrap_or_default().to_owned();
    let detail: Vec<&str> = lines.filter(|l| !l.chars().all(|c| c == '^' || c == ' ')).collect();
    match detail.last() {
        Some(last) => format!("{head}: {last}"),
        None => head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse_to_the_same_rules() {
        let rules = parse_rules(
            "test",
            r#"
            rules = ["tcp/80", "udp/53 from 10.0.0.0/8"]
            [[rule]]
            ports = 443
            [[rule]]
            ports = "8000-8099"
            protocols = ["tcp"]
            to = "203.0.113.0/24"
            [[rule]]
            ports = 80
            to = "198.51.100.5"
            action = "exclude"
            "#,
        )
        .unwrap();
        let texts: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            texts,
            [
                "tcp/80",
                "udp/53 from 10.0.0.0/8",
                "443",
                "tcp/8000-8099 to 203.0.113.0/24",
                "80 to 198.51.100.5/32 exclude"
            ]
        );
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        for (contents, why) in [
            ("rules = [\"tcp/0\"]", "port 0"),
            ("rules = \"tcp/80\"", "invalid type"),
            ("[[rule]]\nport = 80", "unknown field `port`"),
            ("[[rule]]\nports = 80\nprotocols = [\"sctp\"]", "unknown variant"),
            ("rules = [", "invalid"),
        ] {
            let err = parse_rules("rules.toml", contents).unwrap_err().to_string();
            assert!(err.contains("rules.toml") && err.contains(why), "{contents:?}: {err}");
            assert!(!err.contains('\n'), "not one line: {err}");
        }
    }
}
