//! A relay's upstream proxies by name, and their report.

use super::*;

/// A relay's upstream proxies: a default for every flow, and named ones
/// that rules choose with `via NAME` (`via direct`: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams {
    /// For flows whose rule names none.
    pub default: Option<Upstream>,
    /// By name.
    pub named: std::collections::BTreeMap<String, Upstream>,
}

impl Upstreams {
    /// The proxy for a flow whose deciding rule says `via` (`None`: the
    /// default).
    pub fn for_via(&self, via: Option<&str>) -> Option<&Upstream> {
        match via {
            None => self.default.as_ref(),
            Some(crate::rules::DIRECT) => None,
            Some(name) => self.named.get(name),
        }
    }

    /// The proxy for a flow of `proto` from `src` to `dst`, as the rule
    /// that decides for it says; without proxies, no rule is looked at.
    pub fn for_flow(
        &self,
        rules: Option<&crate::rules::RuleSet>,
        proto: crate::rules::Protocol,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Option<&Upstream> {
        if self.default.is_none() && self.named.is_empty() {
            return None;
        }
        let rule = rules.and_then(|r| r.deciding(proto, src.ip(), dst.ip(), dst.port()));
        self.for_via(rule.and_then(|r| r.via.as_deref()))
    }

    /// Refuses rules whose `via` names no proxy here.
    pub fn check(&self, rules: &[crate::rules::Rule]) -> crate::error::Result<()> {
        for rule in rules {
            if let Some(name) = rule.via.as_deref()
                && name != crate::rules::DIRECT
                && !self.named.contains_key(name)
            {
                return Err(crate::error::Error::Rule(format!(
                    "rule {rule}: no upstream named {name:?} (give --upstream {name}=URL)"
                )));
            }
        }
        Ok(())
    }

    /// Every proxy.
    pub fn all(&self) -> impl Iterator<Item = &Upstream> {
        self.default.iter().chain(self.named.values())
    }

    /// Every proxy with its name (`default` for the unnamed one) and its
    /// counters now.
    pub fn report(&self) -> Vec<UpstreamReport> {
        let named = self.named.iter().map(|(name, u)| (name.as_str(), u));
        self.default
            .iter()
            .map(|u| ("default", u))
            .chain(named)
            .map(|(name, u)| UpstreamReport {
                name: name.to_owned(),
                url: u.to_string(),
                opened: u.counters.opened.load(Ordering::Relaxed),
                failed: u.counters.failed.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Adds the upstreams in a file (`--upstream-file`): a `[NAME=]URL` per
    /// line, `#` comments and blank lines ignored. The file holds passwords,
    /// so it is refused when its group or others may read it, or when it is
    /// a link; errors name the line, never its password.
    pub fn add_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        let text = crate::host::files::read_secret(path).map_err(|e| e.to_string())?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.add(line).map_err(|e| format!("{} line {}: {e}", path.display(), number + 1))?;
        }
        Ok(())
    }

    /// Adds `--upstream [NAME=]URL`: one default, each name once.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let (name, url) = match text.split_once('=') {
            Some((name, url)) if !name.contains(':') => (Some(name), url),
            _ => (None, text),
        };
        let upstream =
            url.parse::<UpstreamUrl>().and_then(UpstreamUrl::resolve).map_err(|e| e.to_string())?;
        match name {
            None if self.default.is_some() => {
                Err("more than one --upstream without a name: name them (NAME=URL) and pick with `via NAME`".into())
            }
            None => {
                self.default = Some(upstream);
                Ok(())
            }
            Some(name) if name == crate::rules::DIRECT || !crate::rules::is_upstream_name(name) => {
                Err(format!("upstream name {name:?}: use letters, digits, '-' or '_' (and not \"direct\")"))
            }
            Some(name) => match self.named.insert(name.to_owned(), upstream) {
                Some(_) => Err(format!("upstream {name:?} given twice")),
                None => Ok(()),
            },
        }
    }
}

/// One upstream proxy's counters, for `stats` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamReport {
    /// Its name (`default` for the unnamed one).
    pub name: String,
    /// Its URL, without the password.
    pub url: String,
    /// TCP connections and UDP associations opened through it.
    pub opened: u64,
    /// Handshakes that failed.
    pub failed: u64,
}
