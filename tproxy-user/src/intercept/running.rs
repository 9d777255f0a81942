//! A running interception: its rules changed at run time, its counters,
//! and its stop.

use super::*;

impl Interceptor {
    /// The configuration this interceptor was started with.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// The rules in force, with their counter ids.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Replaces the rules. The new set is validated first; on error the
    /// running set is unchanged. The switch is atomic for the datapath.
    pub fn set_rules(&mut self, rules: Vec<Rule>) -> Result<()> {
        let next = self.rules.replaced(rules)?;
        self.apply(next)
    }

    /// Adds one rule.
    pub fn add_rule(&mut self, rule: Rule) -> Result<()> {
        let next = self.rules.with(rule)?;
        self.apply(next)
    }

    /// Removes one rule.
    pub fn remove_rule(&mut self, rule: &Rule) -> Result<()> {
        let next = self.rules.without(rule)?;
        self.apply(next)
    }

    /// Starts intercepting `proto` to `port`, for every destination.
    pub fn add_port(&mut self, proto: Protocol, port: u16) -> Result<()> {
        self.add_rule(Rule::port(&[proto], port))
    }

    /// Stops intercepting `proto` to `port` (a rule added by [`Self::add_port`]).
    /// Connections already relayed keep flowing.
    pub fn remove_port(&mut self, proto: Protocol, port: u16) -> Result<()> {
        self.remove_rule(&Rule::port(&[proto], port))
    }

    fn apply(&mut self, next: RuleSet) -> Result<()> {
        for (id, rule) in next.iter() {
            if self.rules.iter().all(|(old_id, old)| old_id != id || old != rule) {
                self.datapath.reset_rule_stats(id)?;
            }
        }
        for (proto, port) in next.gated_ports() {
            self.datapath.open_gate(proto.number(), port)?;
            if proto == Protocol::Tcp {
                self.gated_tcp.insert(port);
            }
        }
        self.claim.record_tcp_ports(self.gated_tcp.iter().copied())?;
        self.datapath.replace_rules(next.entries().iter().copied())?;
        // The first set narrows nothing: TIME_WAIT sockets on its ports are
        // not ours (an earlier run's were removed with its records).
        let narrowed = !self.rules.is_empty();
        self.rules = next;
        self.rules_tx.send_replace(Arc::new(self.rules.clone()));
        if narrowed {
            self.remove_unsteered_time_waits();
        }
        Ok(())
    }

    /// The rules in force, updated on every change: the relays end what
    /// they hold for flows no rule intercepts any more.
    pub fn watch_rules(&self) -> watch::Receiver<Arc<RuleSet>> {
        self.rules_tx.subscribe()
    }

    /// The relay's TIME_WAIT sockets carry clients' tuples; for a flow no
    /// rule intercepts now, early demux would attach one to the client's
    /// next forwarded SYN, which `ip_forward` drops for up to a minute.
    fn remove_unsteered_time_waits(&self) {
        let (rules, gated) = (&self.rules, &self.gated_tcp);
        let unsteered = |id: &crate::host::sock_diag::SocketId| {
            let (l, r) = (id.source_address, id.destination_address);
            let (lp, rp) = (id.source_port, id.destination_port);
            // Client side: bound to the destination; spoofed upstream:
            // bound to the client.
            let steered = (gated.contains(&lp) && rules.intercepts(Protocol::Tcp, r, l, lp))
                || (gated.contains(&rp) && rules.intercepts(Protocol::Tcp, l, r, rp));
            (gated.contains(&lp) || gated.contains(&rp)) && !steered
        };
        timewait::purge(Purge::Where(&unsteered), Whose::Ours("of flows no rule intercepts now"));
    }

    /// Where the host's own intercepted sockets meant to go (when there are
    /// [`InterceptConfig::cgroups`]), for the relays' loopback sockets.
    pub fn original_dsts(&self) -> Option<&OriginalDsts> {
        self.original_dsts.as_ref()
    }

    /// A takeover's last step: claims the instance's own name, which the
    /// instance taken over has let go of (or died holding: what it recorded
    /// is removed then), and moves this interceptor's records there.
    ///
    /// `patience`: how long a holder may take to let go (a process being
    /// killed closes its lock after its sockets).
    pub async fn take_name(&mut self, patience: std::time::Duration) -> Result<()> {
        let name = self.config.name.clone();
        let deadline = std::time::Instant::now() + patience;
        let leftover = loop {
            match self.claim.rename(&name) {
                Err(Error::InstanceRunning(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                taken => break taken?,
            }
        };
        remove_recorded(&name, &leftover).await;
        self.config.takeover = false;
        Ok(())
    }

    /// Every TCP port intercepted at some point of this run.
    pub fn intercepted_tcp_ports(&self) -> &HashSet<u16> {
        &self.gated_tcp
    }

    /// The program's counters, all rules together.
    pub fn stats(&self) -> Result<DatapathStats> {
        self.datapath.stats()
    }

    /// The counters of each rule.
    pub fn rule_stats(&self) -> Result<Vec<(Rule, RuleStats)>> {
        self.rules
            .iter()
            .map(|(id, rule)| Ok((rule.clone(), self.datapath.rule_stats(id)?)))
            .collect()
    }

    /// Detaches and removes the routing.
    pub async fn stop(self) -> Result<()> {
        self.stop_then(async {}).await
    }

    /// Detaches, removes the routing and the qdiscs this instance created,
    /// then runs `before_release` (the relays closing, say), and gives up the
    /// name last, so that no other start under the name can meet half of it.
    pub async fn stop_then(
        self,
        before_release: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let Self { datapath, local_table, routing, qdiscs, claim, .. } = self;
        drop(datapath);
        drop(local_table);
        let removed = match routing {
            Some(routing) => routing.remove().await,
            None => Ok(()),
        };
        qdiscs.remove().await;
        before_release.await;
        drop(claim);
        removed
    }
}
