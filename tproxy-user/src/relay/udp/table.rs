//! The session table: one session per (client, original destination),
//! bounded in all and per source, least recently used evicted first, with
//! SOCKS5 associations opened asynchronously.

use super::*;

pub(super) type SessionKey = (SocketAddr, SocketAddr);

/// Where a session's replies to its client come from.
#[derive(Clone)]
pub(super) enum ReplyFrom {
    /// A socket of the session's own, bound to this address (the original
    /// destination) and connected to the client.
    Address(SocketAddr),
    /// The relay's loopback socket that the cgroup hooks sent the client's
    /// datagrams to. Replies go out of it, as no other socket may share its
    /// port: a port shared with SO_REUSEADDR can be taken by any local user.
    Loopback(Arc<UdpSocket>),
}

impl ReplyFrom {
    /// The socket replies to `client` go out of, and the address to send
    /// them to when it is not connected to the client.
    fn open(
        self,
        client: SocketAddr,
        mark: u32,
    ) -> io::Result<(Arc<UdpSocket>, Option<SocketAddr>)> {
        match self {
            Self::Address(from) => {
                Ok((Arc::new(transparent::udp_reply_socket(from, client, mark)?), None))
            }
            Self::Loopback(socket) => Ok((socket, Some(client))),
        }
    }
}

pub(super) struct Session {
    upstream: Arc<UdpSocket>,
    /// Through a SOCKS5 proxy: the association's control connection (it
    /// ends when this closes).
    _control: Option<TcpStream>,
    /// Through a SOCKS5 proxy: the UDP header for the destination, put
    /// before each datagram up.
    header: Option<Arc<[u8]>>,
    activity: Arc<Activity>,
    /// `activity.last_active` when the session was last moved to the front
    /// of the LRU.
    promoted_at: u64,
    /// Ends the session's task, with why: it relays what is queued, closes
    /// the sockets, then logs the outcome.
    stop: oneshot::Sender<&'static str>,
    task: JoinHandle<()>,
}

/// What a session's reply task and the table both update.
#[derive(Default)]
pub(super) struct Activity {
    /// Milliseconds since the table's epoch of the last datagram either way.
    pub(super) last_active: AtomicU64,
    pub(super) bytes_up: AtomicU64,
    pub(super) bytes_down: AtomicU64,
}

pub(super) struct SessionTable {
    settings: RelaySettings,
    config: UdpRelayConfig,
    stats: Arc<UdpRelayStats>,
    local: LocalAddrs,
    sessions: LruCache<SessionKey, Session>,
    /// The sessions of each source, when a source may hold fewer than all.
    per_source: Option<SourceQueues<SessionKey>>,
    /// Sessions whose SOCKS5 association is being opened, with the
    /// datagrams that wait for it.
    opening: HashMap<SessionKey, Vec<Vec<u8>>>,
    /// Payload bytes queued in `opening`, at most [`MAX_QUEUED_BYTES`].
    queued_bytes: usize,
    /// The rules in force, for the sessions' upstream (`via`).
    pub(super) rules: Option<Arc<crate::rules::RuleSet>>,
    /// Where opened associations are reported, to [`Self::finish_open`].
    pub(super) associated: Option<mpsc::UnboundedSender<(SessionKey, io::Result<Association>)>>,
    /// Where each session's entry goes as it ends.
    pub(super) access_log: Option<AccessLog>,
    epoch: Instant,
}

/// An opened SOCKS5 association with the session's reply socket.
pub(super) type Association =
    (crate::relay::upstream::UdpAssociation, (Arc<UdpSocket>, Option<SocketAddr>));

/// Datagrams a session keeps while its association opens; more are dropped.
pub(super) const MAX_WAITING: usize = 64;

/// Bytes all opening associations keep in all: without it, 16 384 opening
/// sessions of 64 datagrams each could queue gigabytes.
pub(super) const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Associations opened at once: each is a TCP connection and a handshake.
pub(super) const MAX_OPENING: usize = 256;

impl SessionTable {
    pub(super) fn new(
        settings: RelaySettings,
        config: UdpRelayConfig,
        stats: Arc<UdpRelayStats>,
        local: LocalAddrs,
    ) -> Self {
        let (sessions, epoch) = (LruCache::unbounded(), Instant::now());
        let (opening, associated) = (HashMap::new(), None);
        let queued_bytes = 0;
        let max = config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        let share = config.max_sessions_per_source.unwrap_or(crate::relay::default_share(max));
        let per_source = (share < max).then(|| SourceQueues::new(share, settings.source_prefixes));
        Self {
            settings,
            config,
            stats,
            local,
            sessions,
            per_source,
            opening,
            queued_bytes,
            rules: None,
            associated,
            access_log: None,
            epoch,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sends one client datagram upstream, opening its session if needed;
    /// the session's replies come from `reply_from` (the original
    /// destination, or the loopback socket the datagram came to).
    pub(super) fn relay(&mut self, datagram: Datagram, payload: &[u8], reply_from: ReplyFrom) {
        let Datagram { client, original_dst: dst, .. } = datagram;
        // Sent straight to our port rather than steered: relaying it would
        // have us send to ourselves.
        if dst.port() == self.settings.listen_port {
            self.stats.refused_loops.fetch_add(1, Relaxed);
            debug!(%client, %dst, "UDP datagram to the relay itself dropped");
            return;
        }
        if crate::relay::local::local_refused(&self.settings, &self.local, client, dst) {
            self.stats.refused_local.fetch_add(1, Relaxed);
            debug!(%client, %dst, "UDP datagram to this host dropped");
            return;
        }
        let now = self.now();
        let key = (client, dst);
        if !self.sessions.contains(&key)
            && let Some(upstream) = self.socks5_for(client, dst)
        {
            self.open_through_socks5(key, upstream, payload, reply_from);
            return;
        }
        if !self.sessions.contains(&key) {
            match self.open(client, dst, reply_from, now) {
                Ok(session) => self.insert(key, session),
                Err(e) => {
                    self.stats.upstream_failures.fetch_add(1, Relaxed);
                    debug!(%client, %dst, error = %e, "UDP session could not be opened");
                    return;
                }
            }
        }
        let session = self.sessions.get_mut(&key).expect("session just ensured");
        session.activity.last_active.store(now, Relaxed);
        session.promoted_at = now;
        // ECONNREFUSED reports an earlier ICMP unreachable; the session
        // stays, as the server may come up.
        let (upstream, header) = (&session.upstream, session.header.as_deref());
        forward(&**upstream, header, payload, Direction::Up, &session.activity, &self.stats);
    }

    /// The SOCKS5 proxy a new session goes through, if the deciding rule's
    /// upstream is one (UDP through any other goes directly).
    fn socks5_for(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> Option<crate::relay::upstream::Upstream> {
        let rules = self.rules.as_deref();
        let proxy =
            self.settings.upstreams.for_flow(rules, crate::rules::Protocol::Udp, client, dst);
        proxy.filter(|u| u.carries_udp()).cloned()
    }

    /// Starts opening a SOCKS5 association for `key`, or queues `payload`
    /// behind the one being opened.
    fn open_through_socks5(
        &mut self,
        key: SessionKey,
        upstream: crate::relay::upstream::Upstream,
        payload: &[u8],
        reply_from: ReplyFrom,
    ) {
        if self.queued_bytes + payload.len() > MAX_QUEUED_BYTES {
            self.stats.queue_full.fetch_add(1, Relaxed);
            return;
        }
        if let Some(waiting) = self.opening.get_mut(&key) {
            if waiting.len() < MAX_WAITING {
                waiting.push(payload.to_vec());
                self.queued_bytes += payload.len();
            } else {
                self.stats.queue_full.fetch_add(1, Relaxed);
            }
            return;
        }
        let Some(report) = self.associated.clone() else { return };
        // Associations being opened count against the session bound too.
        let bound = self.config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS).min(MAX_OPENING);
        if self.opening.len() >= bound {
            self.stats.queue_full.fetch_add(1, Relaxed);
            debug!(client = %key.0, dst = %key.1, "too many UDP associations opening; datagram dropped");
            return;
        }
        self.queued_bytes += payload.len();
        self.opening.insert(key, vec![payload.to_vec()]);
        let dial = DialOptions { mark: self.settings.upstream_mark, ..DialOptions::default() };
        let client = key.0;
        tokio::spawn(async move {
            let association = async {
                let association = upstream.associate_udp(&dial).await?;
                let reply = reply_from.open(client, dial.mark)?;
                Ok((association, reply))
            }
            .await;
            let _ = report.send((key, association));
        });
    }

    /// A SOCKS5 association for `key` opened, or failed: the session
    /// starts with what waited for it, or what waited is dropped.
    pub(super) fn finish_open(&mut self, key: SessionKey, association: io::Result<Association>) {
        let Some(waiting) = self.opening.remove(&key) else { return };
        self.queued_bytes -= waiting.iter().map(Vec::len).sum::<usize>();
        let (client, dst) = key;
        let (association, reply) = match association {
            Ok(opened) => opened,
            Err(e) => {
                self.stats.upstream_failures.fetch_add(1, Relaxed);
                debug!(%client, %dst, error = %e, "UDP ASSOCIATE failed");
                return;
            }
        };
        let now = self.now();
        let header = crate::relay::upstream::socks5_udp_header(dst);
        let session = self.start(
            key,
            Arc::new(association.socket),
            reply,
            Some(association.control),
            Some(header.into()),
            now,
        );
        for payload in &waiting {
            let (upstream, header) = (&session.upstream, session.header.as_deref());
            forward(&**upstream, header, payload, Direction::Up, &session.activity, &self.stats);
        }
        self.insert(key, session);
    }

    fn open(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        reply_from: ReplyFrom,
        now: u64,
    ) -> io::Result<Session> {
        let dial = DialOptions {
            source: self.settings.spoofed_source(client),
            mark: self.settings.upstream_mark,
            ..DialOptions::default()
        };
        let upstream = Arc::new(transparent::udp_upstream(dst, &dial)?);
        let reply = reply_from.open(client, dial.mark)?;
        Ok(self.start((client, dst), upstream, reply, None, None, now))
    }

    /// A session on its sockets, its task relaying replies.
    fn start(
        &self,
        (client, dst): SessionKey,
        upstream: Arc<UdpSocket>,
        (reply, reply_to): (Arc<UdpSocket>, Option<SocketAddr>),
        control: Option<TcpStream>,
        header: Option<Arc<[u8]>>,
        now: u64,
    ) -> Session {
        let activity = Arc::new(Activity::default());
        activity.last_active.store(now, Relaxed);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(relay_replies(
            (client, dst),
            Sockets { upstream: upstream.clone(), reply, reply_to, header: header.clone(), dst },
            activity.clone(),
            self.epoch,
            self.stats.clone(),
            stopped,
            self.access_log.clone().map(|log| {
                let entry = Entry::new(crate::rules::Protocol::Udp, client, dst);
                (log, entry.routed(&self.settings, self.rules.as_deref()))
            }),
        ));
        self.stats.sessions_total.fetch_add(1, Relaxed);
        self.stats.sessions_active.fetch_add(1, Relaxed);
        debug!(%client, %dst, upstream = ?upstream.local_addr().ok(), "UDP session opened");
        Session { upstream, _control: control, header, activity, promoted_at: now, stop, task }
    }

    /// Adds a session, after closing its source's oldest if the source is
    /// at its bound, and the least recently used if the table is full.
    fn insert(&mut self, key: SessionKey, session: Session) {
        let sessions = &self.sessions;
        let oldest =
            self.per_source.as_mut().and_then(|p| p.over(key.0.ip(), |k| sessions.contains(k)));
        if let Some(session) = oldest.and_then(|old| self.remove(old)) {
            self.stats.sessions_evicted_per_source.fetch_add(1, Relaxed);
            self.close(session, "evicted: its source is at its bound");
        }
        self.make_room();
        self.sessions.put(key, session);
        if let Some(p) = &mut self.per_source {
            p.added(key.0.ip(), key);
        }
    }

    /// Takes a session out of the table.
    fn remove(&mut self, key: SessionKey) -> Option<Session> {
        let session = self.sessions.pop(&key)?;
        self.released(key);
        Some(session)
    }

    /// `key` left the table.
    fn released(&mut self, key: SessionKey) {
        let sessions = &self.sessions;
        if let Some(p) = &mut self.per_source {
            p.removed(key.0.ip(), key, |k| sessions.contains(k));
        }
    }

    /// Evicts least recently used sessions until one more fits. A session
    /// whose server spoke since it was last promoted gets a second chance.
    fn make_room(&mut self) {
        let mut second_chances = self.sessions.len();
        while self.sessions.len() >= self.config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS) {
            let Some((key, mut session)) = self.sessions.pop_lru() else { return };
            let last = session.activity.last_active.load(Relaxed);
            if last > session.promoted_at && second_chances > 0 {
                second_chances -= 1;
                session.promoted_at = last;
                self.sessions.put(key, session);
                continue;
            }
            self.released(key);
            self.stats.sessions_evicted.fetch_add(1, Relaxed);
            self.close(session, "evicted: the table is full");
        }
    }

    /// Closes sessions idle for longer than the timeout.
    pub(super) fn expire(&mut self) {
        let idle = self.config.idle_timeout.as_millis() as u64;
        let now = self.now();
        let expired: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_sub(s.activity.last_active.load(Relaxed)) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(session) = self.remove(key) {
                self.stats.sessions_expired.fetch_add(1, Relaxed);
                self.close(session, "expired");
            }
        }
    }

    /// Ends a session. Its task logs the outcome once the sockets are
    /// closed, so that the line means the reply socket takes no more.
    fn close(&self, session: Session, outcome: &'static str) -> JoinHandle<()> {
        // Datagrams the program already handed to the session's sockets
        // are relayed before they close; later ones open a new session.
        let _ = session.stop.send(outcome);
        self.stats.sessions_active.fetch_sub(1, Relaxed);
        session.task
    }

    /// Closes the sessions of flows that `rules` no longer intercept.
    pub(super) fn close_unsteered(&mut self, rules: &crate::rules::RuleSet) {
        let gone: Vec<SessionKey> = self
            .sessions
            .iter()
            .map(|(k, _)| *k)
            .filter(|(client, dst)| {
                !rules.intercepts(crate::rules::Protocol::Udp, client.ip(), dst.ip(), dst.port())
            })
            .collect();
        for key in gone {
            if let Some(session) = self.remove(key) {
                self.close(session, "closed: no rule intercepts it now");
            }
        }
    }

    /// Closes every session, and waits until their sockets are closed.
    pub(super) async fn close_all(&mut self) {
        let mut tasks = Vec::with_capacity(self.sessions.len());
        while let Some((_, session)) = self.sessions.pop_lru() {
            tasks.push(self.close(session, "closed: shutting down"));
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}
