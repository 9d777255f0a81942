//! Starting: attach, install the routing, and hand the relay's sockets to
//! the datapath.

use super::*;

impl Loaded {
    /// The configuration, with the routing values chosen.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// Registers the relay's sockets, installs the rules and the routing,
    /// and attaches to every interface. What is left needs CAP_NET_ADMIN
    /// only.
    pub async fn start(self, sockets: &[(RelaySocket, BorrowedFd<'_>)]) -> Result<Interceptor> {
        let Loaded { config, kinds, cgroups, original_dst_cgroup, claim, mut datapath, kernel } =
            self;
        if let (Target::Port(target), false) = (config.target, sockets.is_empty()) {
            return Err(Error::Config(format!(
                "relay sockets given to interception that steers to port {}",
                target.port
            )));
        }
        for &(socket, fd) in sockets {
            if socket.loopback() {
                let addr = socket2::SockRef::from(&fd)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| Error::Config(format!("{socket:?} socket is not bound")))?;
                datapath.set_cgroup_target(socket.slot(), Some(addr))?;
            } else {
                datapath.set_listener(socket.slot(), &fd)?;
            }
        }
        if let (Target::Port(target), false) = (config.target, cgroups.is_empty()) {
            let v4 = target.ipv4.unwrap_or(Ipv4Addr::LOCALHOST);
            let v6 = target.ipv6.unwrap_or(Ipv6Addr::LOCALHOST);
            for (slot, ip) in [
                (tproxy_ebpf::slot::TCP_V4, v4.into()),
                (tproxy_ebpf::slot::UDP_V4, v4.into()),
                (tproxy_ebpf::slot::TCP_V6, v6.into()),
                (tproxy_ebpf::slot::UDP_V6, v6.into()),
            ] {
                datapath
                    .set_cgroup_target(slot, Some(std::net::SocketAddr::new(ip, target.port)))?;
            }
        }
        let original_dsts =
            if cgroups.is_empty() { None } else { Some(datapath.take_original_dsts()?) };
        match datapath.attach_reopen() {
            // Before 6.5 it also hands new flows to another program's
            // SO_REUSEPORT listener (see `Target::Port`).
            Err(e) if matches!(config.target, Target::Port(_)) => return Err(e),
            Err(e) => warn!("{e}: a SYN that meets a TIME_WAIT socket will wait for its retry"),
            Ok(()) => {}
        }
        // Before anything is attached: the host's own traffic is never steered.
        let local_table = LocalTable::start(datapath.take_local_dests()?).await?;
        let mut interceptor = Interceptor {
            datapath,
            local_table: Some(local_table),
            routing: None,
            qdiscs: CreatedQdiscs(Vec::new()),
            claim,
            config,
            rules: RuleSet::default(),
            gated_tcp: HashSet::new(),
            rules_tx: watch::Sender::new(Arc::default()),
            original_dsts,
        };
        interceptor.set_rules(interceptor.config.rules.clone())?;
        interceptor.routing = Some(PolicyRouting::install(interceptor.config.routing()).await?);
        let tcx = kernel::TCX.in_kernel(kernel);
        for (iface, kind) in interceptor.config.interfaces.iter().zip(kinds) {
            let attached = interceptor.datapath.attach(iface, kind, tcx)?;
            if attached.created_qdisc {
                interceptor.qdiscs.0.push(iface.clone());
                interceptor.claim.record_qdisc(iface)?;
            }
            if let Some(filter) = attached.filter {
                interceptor.claim.record(filter)?;
            }
        }
        if let Some(proxy) = &original_dst_cgroup {
            interceptor.datapath.attach_original_dst_answers(&cgroups, proxy)?;
        }
        for cgroup in &cgroups {
            interceptor.datapath.attach_cgroup(cgroup)?;
        }
        let mut places: Vec<String> = Vec::new();
        if !interceptor.config.interfaces.is_empty() {
            places.push(format!(
                "{} at TC ingress ({})",
                interceptor.config.interfaces.join(", "),
                if tcx { "tcx" } else { "netlink clsact" }
            ));
        }
        if !cgroups.is_empty() {
            let paths: Vec<String> = cgroups.iter().map(|c| c.path.display().to_string()).collect();
            places.push(format!("cgroup {}", paths.join(", ")));
        }
        info!(
            "attached to {}; rules: {}",
            places.join(" and "),
            interceptor.rules.iter().map(|(_, r)| r.to_string()).collect::<Vec<_>>().join(", ")
        );
        // The TC program's lookup: the cgroup hooks connect to the target
        // like any client.
        if let (Target::Port(target), false) =
            (interceptor.config.target, interceptor.config.interfaces.is_empty())
        {
            let protocols: HashSet<Protocol> =
                interceptor.rules.gated_ports().map(|(p, _)| p).collect();
            for finding in check_port_target(&target, &protocols) {
                warn!("{finding}");
            }
        }
        Ok(interceptor)
    }
}

/// clsact qdiscs this instance created; removed at the end unless some
/// other filter now uses them.
pub(super) struct CreatedQdiscs(Vec<String>);

impl CreatedQdiscs {
    pub(super) async fn remove(mut self) {
        for iface in std::mem::take(&mut self.0) {
            datapath::remove_clsact_if_unused(&iface).await;
        }
    }
}

impl Drop for CreatedQdiscs {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let ifaces = std::mem::take(&mut self.0);
        let _ = netlink::block_on(async {
            for iface in &ifaces {
                datapath::remove_clsact_if_unused(iface).await;
            }
        });
    }
}
