//! Loading: checks, the claim, and the programs, with no runtime yet.

use super::*;

impl Interceptor {
    /// [`Interceptor::load`], then [`Loaded::start`]: on error nothing stays
    /// attached or installed.
    pub async fn start(
        config: InterceptConfig,
        sockets: &[(RelaySocket, BorrowedFd<'_>)],
    ) -> Result<Self> {
        Self::load(config)?.start(sockets).await
    }

    /// Checks the configuration, the privileges, the kernel and the
    /// interfaces, claims the name and loads the programs (see [`Loaded`]).
    pub fn load(mut config: InterceptConfig) -> Result<Loaded> {
        config.validate()?;
        system::check_privileges()?;
        let kernel = kernel::SK_ASSIGN.require()?;
        if let Target::Port(_) = config.target {
            kernel::SOCKMAP_UPDATE.require()?;
        }
        let kinds: Vec<_> = config
            .interfaces
            .iter()
            .map(|iface| system::ifindex(iface).and_then(|_| system::link_kind(iface)))
            .collect::<Result<_>>()?;
        if !config.cgroups.is_empty() {
            kernel::CGROUP_HOOKS.require()?;
        }
        let cgroups =
            config.cgroups.iter().map(|path| cgroup::open(path)).collect::<Result<Vec<_>>>()?;
        let original_dst_cgroup =
            config.original_dst_cgroup.as_deref().map(cgroup::open).transpose()?;
        if !cgroups.is_empty() && !kernel::NETNS_COOKIE.in_kernel(kernel) {
            warn!(
                "this kernel cannot name the network namespace to the cgroup hooks (SO_NETNS_COOKIE, 5.14): the cgroup's processes in other network namespaces are rewritten too"
            );
        }
        system::raise_memlock_limit();
        let claim = claim::claim(&mut config)?;
        let datapath = load_programs(&config, &kinds).inspect_err(|_| {
            // Before 5.11 maps count against RLIMIT_MEMLOCK, which only
            // CAP_SYS_RESOURCE can raise.
            if !kernel::MEMCG_ACCOUNTING.in_kernel(kernel) && !nix::unistd::geteuid().is_root() {
                warn!(
                    "on this kernel BPF maps count against RLIMIT_MEMLOCK: raise it for this user (systemd: LimitMEMLOCK=infinity; prlimit --memlock=unlimited)"
                );
            }
        })?;
        Ok(Loaded { config, kinds, cgroups, original_dst_cgroup, claim, datapath, kernel })
    }
}

/// Loads the programs for `config`, with the TC programs for the interface
/// kinds in `links` (see [`Datapath::load`]).
pub fn load_programs(config: &InterceptConfig, links: &[system::LinkKind]) -> Result<Datapath> {
    Datapath::load(&datapath::Settings {
        mark: config.mark,
        upstream_mark: config.upstream_mark,
        return_path: config.spoof_source,
        intercept_local: config.intercept_local,
        unparsed: config.unparsed,
        trace: false,
        ethernet_links: links.contains(&system::LinkKind::Ethernet),
        l3_links: links.contains(&system::LinkKind::L3),
        target: config.target,
        cgroup_hooks: !config.cgroups.is_empty(),
        original_dst_answers: config.original_dst_cgroup.is_some(),
        netns_cookie: if config.cgroups.is_empty() { 0 } else { system::netns_cookie() },
        local_dests_capacity: config
            .local_dests_capacity
            .unwrap_or_else(local_table::default_capacity),
    })
}
