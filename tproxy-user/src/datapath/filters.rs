//! The netlink TC filters of ours on an interface: found by their program's
//! name, removed exactly, and the clsact qdisc with the last of them.

use super::*;

/// A netlink TC filter, enough to find and delete it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetlinkFilter {
    /// The interface.
    pub iface: String,
    /// The filter's priority.
    pub priority: u16,
    /// The filter's handle.
    pub handle: u32,
}

/// Removes a netlink filter that a killed instance recorded, if it still
/// carries our program: a record is never enough to delete someone else's
/// filter. TCX links cannot be left behind: they die with their owner.
pub async fn remove_filter(filter: &NetlinkFilter) {
    match our_filters(&filter.iface).await {
        Ok(ours) if ours.contains(filter) => detach_filter(filter),
        Ok(_) => debug!(
            "no filter of ours on {} at priority {} (handle {:#x}); nothing removed",
            filter.iface, filter.priority, filter.handle
        ),
        Err(e) => debug!("{}: {e}", filter.iface),
    }
}

fn detach_filter(filter: &NetlinkFilter) {
    let link = SchedClassifierLink::attached(
        &filter.iface,
        TcAttachType::Ingress,
        filter.priority,
        filter.handle.into(),
        None,
    );
    match link.map(|link| link.detach()) {
        Ok(Ok(())) => warn!(
            "removed the TC filter an earlier run left on {} (priority {})",
            filter.iface, filter.priority
        ),
        Ok(Err(e)) => debug!("no leftover TC filter on {}: {e}", filter.iface),
        Err(e) => debug!("{}: {e}", filter.iface),
    }
}

/// The netlink ingress filters on `iface` whose BPF program is ours (by
/// its name, which the kernel reports).
async fn our_filters(iface: &str) -> Result<Vec<NetlinkFilter>> {
    use futures::TryStreamExt as _;
    use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
    let index = crate::host::system::ifindex(iface)?;
    let filters: Vec<_> = crate::host::netlink::with_handle(|handle| async move {
        handle.traffic_filter(index as i32).get().ingress().execute().try_collect::<Vec<_>>().await
    })
    .await?
    .map_err(|e| Error::Routing(format!("listing the TC filters of {iface}: {e}")))?;
    Ok(filters
        .into_iter()
        .filter(|filter| {
            filter.attributes.iter().any(|a| match a {
                TcAttribute::Options(options) => options.iter().any(|o| {
                    matches!(o, TcOption::Bpf(TcFilterBpfOption::ProgName(n)) if n.starts_with(names::PROGRAM))
                }),
                _ => false,
            })
        })
        .map(|filter| NetlinkFilter {
            iface: iface.to_owned(),
            priority: (filter.header.info >> 16) as u16,
            handle: (u32::from(filter.header.handle.major) << 16)
                | u32::from(filter.header.handle.minor),
        })
        .collect())
}

/// Removes every netlink filter of this program on `iface` that is not in
/// `keep` (live instances' filters): `tproxy-user cleanup IFACE` when the
/// records are lost.
pub async fn remove_unrecorded_filters(iface: &str, keep: &[NetlinkFilter]) -> Result<()> {
    for filter in our_filters(iface).await? {
        if !keep.contains(&filter) {
            detach_filter(&filter);
        }
    }
    Ok(())
}

/// Removes the clsact qdisc of `iface` unless a filter still uses it.
pub async fn remove_clsact_if_unused(iface: &str) {
    use futures::TryStreamExt as _;
    use rtnetlink::packet_route::tc::TcHandle;
    let Ok(index) = crate::host::system::ifindex(iface) else { return };
    let result = crate::host::netlink::with_handle(|handle| async move {
        let mut filters = handle.traffic_filter(index as i32);
        let ingress: Vec<_> = filters.get().ingress().execute().try_collect().await?;
        let egress: Vec<_> =
            handle.traffic_filter(index as i32).get().egress().execute().try_collect().await?;
        // A dump lists one header entry per filter chain and priority.
        if !ingress.is_empty() || !egress.is_empty() {
            return Ok(false);
        }
        let mut request = handle.qdisc().del(index as i32);
        request.message_mut().header.parent = TcHandle::CLSACT;
        request.execute().await.map(|()| true)
    })
    .await;
    match result {
        Ok(Ok(true)) => debug!("removed the clsact qdisc of {iface}"),
        Ok(Ok(false)) => debug!("the clsact qdisc of {iface} still has filters; it stays"),
        Ok(Err(e)) => debug!("removing the clsact qdisc of {iface}: {e}"),
        Err(e) => debug!("removing the clsact qdisc of {iface}: {e}"),
    }
}
