//! The first step: claim the name, remove what a dead run under it left,
//! and choose the routing values.

use super::*;

/// Claims `config.name`, removes what a dead instance of that name left,
/// and chooses the routing (see [`InterceptConfig::choose_free_routing`]),
/// updating `config`; nothing else's state is touched.
pub(super) fn claim(config: &mut InterceptConfig) -> Result<Claim> {
    let name = match config.takeover {
        true => instance::takeover_name(&config.name),
        false => config.name.clone(),
    };
    let (mut claim, leftover) = Claim::acquire(&name)?;
    netlink::block_on(async {
        remove_recorded(&name, &leftover).await;
        // A takeover killed half way leaves its own records.
        if !config.takeover {
            remove_dead_takeover(&config.name).await;
        }
        // Once recorded, the choice is visible to every later start: the
        // lock covers only choosing and recording.
        let _allocation = AllocationLock::acquire()?;
        choose_routing(config, &name, &mut claim).await
    })??;
    Ok(claim)
}

/// Replaces the config's routing values by the first free set, or checks
/// the given ones, and records the choice before anything is installed.
/// Removes what a takeover of `name` that died before it took the name
/// recorded, unless one is running.
async fn remove_dead_takeover(name: &str) {
    let next = instance::takeover_name(name);
    if let Ok((claim, leftover)) = Claim::acquire(&next) {
        remove_recorded(&next, &leftover).await;
        drop(claim);
    }
}

/// `claimed` is the name this start holds (a takeover's interim one: the
/// instance it takes over counts as live).
async fn choose_routing(
    config: &mut InterceptConfig,
    claimed: &str,
    claim: &mut Claim,
) -> Result<()> {
    let live = instance::live_instances(claimed)?;
    let candidates: Vec<(u32, u32, u32, u32)> = if config.choose_free_routing {
        (0..64)
            .map(|k| {
                (
                    DEFAULT_MARK + 2 * k,
                    DEFAULT_UPSTREAM_MARK + 2 * k,
                    DEFAULT_TABLE + k,
                    DEFAULT_RULE_PRIORITY + k,
                )
            })
            .collect()
    } else {
        vec![(config.mark, config.upstream_mark, config.table, config.rule_priority)]
    };
    let mut first_refusal = None;
    for (mark, upstream, table, priority) in candidates {
        let routing = RoutingConfig { mark, table, priority, ipv6: system::ipv6_enabled() };
        let held = live.iter().find(|(_, s)| {
            let theirs = [s.routing.map(|r| r.mark), Some(s.upstream_mark)];
            s.routing.is_some_and(|r| r.table == table)
                || theirs.contains(&Some(mark))
                || theirs.contains(&Some(upstream))
        });
        let refusal = match held {
            Some((name, _)) => Some(format!(
                "fwmark {mark:#x}, upstream mark {upstream:#x} or table {table} is held by the running instance {name:?}"
            )),
            None => routing::conflicts(&routing).await?.into_iter().next(),
        };
        match refusal {
            Some(why) => {
                first_refusal.get_or_insert(why);
            }
            None => {
                if let Some(why) = &first_refusal {
                    info!(
                        "{why}; this instance uses fwmark {mark:#x}, table {table}, rule priority {priority}, upstream mark {upstream:#x}"
                    );
                }
                (config.mark, config.upstream_mark, config.table, config.rule_priority) =
                    (mark, upstream, table, priority);
                return claim.record_routing(routing, upstream);
            }
        }
    }
    let why = first_refusal.unwrap_or_default();
    Err(Error::RoutingConflict(if config.choose_free_routing {
        format!("no free mark and table near the defaults ({why})")
    } else {
        format!("{why}; give this instance other --mark, --table and --upstream-mark values")
    }))
}
