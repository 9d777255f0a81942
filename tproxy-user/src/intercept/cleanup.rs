//! Removing what a dead instance left.

use super::*;

/// Removes what a dead instance recorded: its netlink filters and the
/// qdiscs it created, its routing, and its relay's TIME_WAIT sockets, which
/// would black-hole clients reusing their ports for a minute.
pub(super) async fn remove_recorded(name: &str, leftover: &instance::InstanceState) {
    if leftover.netns != 0 && instance::netns_id().is_ok_and(|id| id != leftover.netns) {
        warn!(
            "instance {name:?} last ran in another network namespace; what it left there can only be removed there"
        );
        return;
    }
    for filter in &leftover.filters {
        datapath::remove_filter(filter).await;
    }
    for iface in &leftover.qdiscs {
        datapath::remove_clsact_if_unused(iface).await;
    }
    if let Some(routing) = &leftover.routing {
        match routing::remove(routing).await {
            Ok(()) => warn!(
                "removed the policy routing an earlier run of {name:?} left (fwmark {:#x}, table {})",
                routing.mark, routing.table
            ),
            Err(e) => warn!("could not remove an earlier run's routing: {e}"),
        }
    }
    if leftover.tcp_ports.is_empty() {
        return;
    }
    let ports: HashSet<u16> = leftover.tcp_ports.iter().copied().collect();
    timewait::purge(Purge::Ports(&ports), Whose::Leftover);
}

/// `tproxy-user cleanup`: removes exactly what a dead instance named `name`
/// recorded (nothing when it never ran), and every tproxy TC filter on
/// `interfaces` that no live instance recorded, for when records are lost.
/// Refuses while `name` runs.
pub async fn remove_leftovers(name: &str, interfaces: &[String]) -> Result<()> {
    validate_name(name)?;
    let Some(leftover) = instance::leftovers(name)? else {
        return Err(Error::InstanceRunning(name.to_owned()));
    };
    remove_recorded(name, &leftover).await;
    // The dead instance's control socket.
    let _ = std::fs::remove_file(crate::instance::socket_path(name));
    let live: Vec<instance::NetlinkFilter> =
        instance::live_instances(name)?.into_iter().flat_map(|(_, s)| s.filters).collect();
    for iface in interfaces {
        datapath::remove_unrecorded_filters(iface, &live).await?;
    }
    Ok(())
}
