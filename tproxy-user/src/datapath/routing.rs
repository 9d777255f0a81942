//! The policy routing that makes the kernel deliver steered packets locally:
//! `ip rule fwmark M lookup T` and `local default dev lo table T`, for IPv4
//! and IPv6, installed and removed over rtnetlink.
//!
//! `bpf_sk_assign` alone is not enough: routing runs after TC ingress, and a
//! packet whose destination is not local would be forwarded or dropped.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};
use tracing::{info, trace, warn};

use crate::{
    error::{Error, Result},
    host::{
        netlink::{self, Netlink},
        system,
    },
};

/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

/// The origin our rules and routes carry (`ip rule`/`ip route` show
/// `proto 116`; iproute2 names no protocol so). Removal takes only what
/// carries it: a state file that names another tool's mark, table and
/// priority cannot make root's `cleanup` remove that tool's routing, and
/// only a process with CAP_NET_ADMIN could tag routing as ours.
const OURS: RouteProtocol = RouteProtocol::Other(116);

/// Identifies our routing state: the mark our program sets, the table it
/// routes to, and the rule priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoutingConfig {
    /// The fwmark the rule matches.
    pub mark: u32,
    /// The table with the local default route.
    pub table: u32,
    /// The rule's priority.
    pub priority: u32,
    /// Also install the IPv6 rule and route.
    pub ipv6: bool,
}

/// Installed policy routing. `remove` takes it down; if the value is dropped
/// without that (an error path, a panic), `Drop` removes it all the same.
pub struct PolicyRouting {
    config: RoutingConfig,
    installed: bool,
}

impl PolicyRouting {
    /// Checks that nothing uses the mark or the table, and installs the
    /// rules and routes. What is in the way is refused, never removed.
    pub async fn install(config: RoutingConfig) -> Result<Self> {
        let lo = system::ifindex("lo")?;
        let netlink = Netlink::connect()?;
        check_conflicts(&netlink.handle, &config).await?;
        // From here on, Drop undoes whatever part was added.
        let routing = Self { config, installed: true };
        for family in config.families() {
            netlink.add_route(family, config.table, lo).await?;
            // First at the shared priority: lookups the host itself makes
            // with our mark use the main table (see `add_local_rule`).
            netlink.add_local_rule(family, &config).await?;
            netlink.add_rule(family, &config).await?;
        }
        info!(
            "policy routing: fwmark {:#x} -> table {} (local default dev lo), priority {}",
            config.mark, config.table, config.priority
        );
        Ok(routing)
    }

    /// Removes the rules and routes.
    pub async fn remove(mut self) -> Result<()> {
        self.installed = false;
        remove(&self.config).await
    }
}

impl Drop for PolicyRouting {
    fn drop(&mut self) {
        if !self.installed {
            return;
        }
        let config = self.config;
        // Drop cannot await.
        if !matches!(netlink::block_on(remove(&config)), Ok(Ok(()))) {
            warn!("could not remove policy routing for table {}", config.table);
        }
    }
}

impl RoutingConfig {
    fn families(&self) -> &'static [IpVersion] {
        if self.ipv6 { &[IpVersion::V4, IpVersion::V6] } else { &[IpVersion::V4] }
    }
}

/// Removes exactly our rules (priority P: fwmark M → table T) and our local
/// default routes in table T, in both families, each only if it carries
/// our protocol, 116 (`OURS`). Succeeds when there is nothing to remove.
pub async fn remove(config: &RoutingConfig) -> Result<()> {
    let netlink = Netlink::connect()?;
    remove_with(&netlink.handle, config).await
}

async fn remove_with(handle: &Handle, config: &RoutingConfig) -> Result<()> {
    for family in [IpVersion::V4, IpVersion::V6] {
        if family == IpVersion::V6 && !system::ipv6_enabled() {
            continue;
        }
        for rule in rules(handle, family.clone()).await? {
            let ours = rule_protocol(&rule) == Some(OURS)
                && rule_mark(&rule) == Some(config.mark)
                && rule_priority(&rule) == Some(config.priority)
                && (rule_table(&rule) == config.table
                    || (rule_table(&rule) == MAIN_TABLE && rule_iif(&rule) == Some("lo")));
            if ours {
                trace!("removing rule {rule:?}");
                ignore_missing(handle.rule().del(rule).execute().await)
                    .map_err(routing_err("removing a rule"))?;
            }
        }
        for route in routes(handle, family).await? {
            if route_table(&route) == config.table
                && is_local_default(&route)
                && route.header.protocol == OURS
            {
                trace!("removing route {route:?}");
                ignore_missing(handle.route().del(route).execute().await)
                    .map_err(routing_err("removing a route"))?;
            }
        }
    }
    Ok(())
}

/// Refuses to share a mark or a table with someone else's routing.
async fn check_conflicts(handle: &Handle, config: &RoutingConfig) -> Result<()> {
    match conflicts_with(handle, config).await?.into_iter().next() {
        Some(conflict) => Err(Error::RoutingConflict(conflict)),
        None => Ok(()),
    }
}

/// Rules and routes of someone else that use our mark or table, one line each.
pub async fn conflicts(config: &RoutingConfig) -> Result<Vec<String>> {
    let netlink = Netlink::connect()?;
    conflicts_with(&netlink.handle, config).await
}

async fn conflicts_with(handle: &Handle, config: &RoutingConfig) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for family in config.families() {
        let v = if *family == IpVersion::V6 { "-6 " } else { "" };
        for rule in rules(handle, family.clone()).await? {
            let (mark, table) = (rule_mark(&rule), rule_table(&rule));
            if mark == Some(config.mark) || table == config.table {
                found.push(format!(
                    "fwmark {:#x} or table {} is in use by another rule (ip {v}rule: priority {}{} lookup {table})",
                    config.mark,
                    config.table,
                    rule_priority(&rule).unwrap_or(0),
                    mark.map(|m| format!(" fwmark {m:#x}")).unwrap_or_default(),
                ));
            }
        }
        if routes(handle, family.clone()).await?.iter().any(|r| route_table(r) == config.table) {
            found.push(format!(
                "routing table {} already has routes (ip {v}route show table {})",
                config.table, config.table
            ));
        }
    }
    found.dedup();
    Ok(found)
}

/// Fails if the kernel cannot do IPv6 policy routing
/// (CONFIG_IPV6_MULTIPLE_TABLES).
pub async fn probe_ipv6_rules() -> Result<()> {
    let netlink = Netlink::connect()?;
    rules(&netlink.handle, IpVersion::V6).await.map(drop)
}

/// The requests that install the routing.
impl Netlink {
    async fn add_route(&self, family: &IpVersion, table: u32, lo: u32) -> Result<()> {
        let message = match family {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .table_id(table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .output_interface(lo)
                .protocol(OURS)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .table_id(table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .output_interface(lo)
                .protocol(OURS)
                .build(),
        };
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(routing_err("adding the local route"))
    }

    /// `fwmark M iif lo lookup main`: lookups the host itself makes with the
    /// mark (iif lo) use the main table. The kernel's source check of a
    /// steered packet is one of those when `src_valid_mark` is on (wg-quick
    /// sets it): through our table the client's address would be local,
    /// and the packet dropped as a martian. So is any packet of the host's
    /// own that carries the mark (`tcp_fwmark_accept` replies).
    async fn add_local_rule(&self, family: &IpVersion, config: &RoutingConfig) -> Result<()> {
        let mut request = self
            .handle
            .rule()
            .add()
            .fw_mark(config.mark)
            .input_interface("lo")
            .table_id(MAIN_TABLE)
            .priority(config.priority)
            .action(RuleAction::ToTable);
        request.message_mut().attributes.push(RuleAttribute::Protocol(OURS));
        let result = match family {
            IpVersion::V4 => request.v4().execute().await,
            IpVersion::V6 => request.v6().execute().await,
        };
        result.map_err(routing_err("adding the fwmark rule for the host's own lookups"))
    }

    async fn add_rule(&self, family: &IpVersion, config: &RoutingConfig) -> Result<()> {
        let mut request = self
            .handle
            .rule()
            .add()
            .fw_mark(config.mark)
            .table_id(config.table)
            .priority(config.priority)
            .action(RuleAction::ToTable);
        request.message_mut().attributes.push(RuleAttribute::Protocol(OURS));
        let result = match family {
            IpVersion::V4 => request.v4().execute().await,
            IpVersion::V6 => request.v6().execute().await,
        };
        result.map_err(routing_err("adding the fwmark rule"))
    }
}

async fn rules(handle: &Handle, family: IpVersion) -> Result<Vec<RuleMessage>> {
    handle.rule().get(family).execute().try_collect().await.map_err(routing_err("listing rules"))
}

pub(crate) async fn routes(handle: &Handle, family: IpVersion) -> Result<Vec<RouteMessage>> {
    let message = match family {
        IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    handle.route().get(message).execute().try_collect().await.map_err(routing_err("listing routes"))
}

fn rule_mark(rule: &RuleMessage) -> Option<u32> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::FwMark(mark) => Some(*mark),
        _ => None,
    })
}

fn rule_protocol(rule: &RuleMessage) -> Option<RouteProtocol> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Protocol(p) => Some(*p),
        _ => None,
    })
}

fn rule_iif(rule: &RuleMessage) -> Option<&str> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Iifname(name) => Some(name.as_str()),
        _ => None,
    })
}

fn rule_priority(rule: &RuleMessage) -> Option<u32> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    })
}

fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(rule.header.table.into())
}

pub(crate) fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

fn is_local_default(route: &RouteMessage) -> bool {
    route.header.kind == RouteType::Local
        && route.header.destination_prefix_length == 0
        && matches!(route.header.address_family, AddressFamily::Inet | AddressFamily::Inet6)
}

/// Removal is idempotent: what is already gone counts as removed.
fn ignore_missing(result: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code().abs() == libc::ENOENT || e.raw_code().abs() == libc::ESRCH =>
        {
            Ok(())
        }
        other => other,
    }
}

fn routing_err(what: &'static str) -> impl Fn(rtnetlink::Error) -> Error {
    move |e| Error::Routing(format!("{what}: {e}"))
}
