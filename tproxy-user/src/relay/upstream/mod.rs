//! Chaining to an upstream proxy (`--upstream URL`): instead of dialling a
//! flow's original destination, the relay asks a proxy to.
//!
//! - `socks5://[user:pass@]HOST:PORT`: TCP through CONNECT, UDP through UDP
//!   ASSOCIATE (one association per session), username/password auth
//!   (RFC 1929), IPv6 destinations. The protocol is fast-socks5's.
//! - `http://[user:pass@]HOST:PORT`: TCP through HTTP CONNECT with Basic
//!   auth. Written here: a request line and a status line, read byte by
//!   byte so that nothing the origin sends after the proxy's answer is taken
//!   from the socket, which the relay then splices raw.
//! - `proxy-v2://HOST:PORT`: TCP to a fixed upstream that learns the client
//!   and the original destination from a PROXY protocol v2 header (ppp's
//!   builder), with a unique-id TLV per connection.
//!
//! Every handshake runs on a plain, marked `TcpStream`, handed back as it
//! is: the splice path applies after it.

use std::{
    fmt, io,
    net::{SocketAddr, ToSocketAddrs},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::transparent::{self, DialOptions};

mod set;
mod url;

pub use set::{UpstreamReport, Upstreams};
pub use url::{BadUpstream, UpstreamUrl};

/// A username and password for the upstream proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub username: String,
    /// The password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:***", self.username)
    }
}

/// How an upstream proxy is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SOCKS5 (RFC 1928), TCP and UDP.
    Socks5,
    /// HTTP CONNECT, TCP only.
    HttpConnect,
    /// PROXY protocol v2 before the data, TCP only.
    ProxyV2,
}

/// An upstream proxy. Clones share its counters.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The protocol.
    pub kind: Kind,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its credentials, if it wants them (SOCKS5 and HTTP).
    pub credentials: Option<Credentials>,
    /// What became of the connections and associations opened through it.
    pub counters: Arc<UpstreamCounters>,
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, self.addr, &self.credentials) == (other.kind, other.addr, &other.credentials)
    }
}

impl Eq for Upstream {}

/// Per upstream proxy: handshakes that succeeded, and those that failed
/// (the proxy refused, timed out or could not be reached).
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// TCP connections and UDP associations opened through it.
    pub opened: AtomicU64,
    /// Those that failed; the client was reset (TCP) or its datagrams
    /// dropped (UDP).
    pub failed: AtomicU64,
}

impl UpstreamCounters {
    fn count<T>(&self, result: &io::Result<T>) {
        let counter = if result.is_ok() { &self.opened } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Numbers connections for the PROXY v2 unique-id TLV.
static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

impl Upstream {
    /// Whether it carries UDP (SOCKS5's UDP ASSOCIATE).
    pub fn carries_udp(&self) -> bool {
        self.kind == Kind::Socks5
    }

    /// A TCP connection to `dst` for `client` through the proxy, handshake
    /// done, within `options.timeout` in all. `options.mark` applies; the
    /// proxy is dialled from the host's own address.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        client: SocketAddr,
        options: &DialOptions,
    ) -> io::Result<TcpStream> {
        let dial = DialOptions { source: None, ..*options };
        let handshake = async {
            let mut stream = transparent::tcp_dial(self.addr, &dial).await?;
            match self.kind {
                Kind::Socks5 => socks5_connect(stream, dst, self.credentials.as_ref()).await,
                Kind::HttpConnect => {
                    http_connect(&mut stream, dst, self.credentials.as_ref()).await?;
                    Ok(stream)
                }
                Kind::ProxyV2 => {
                    stream.write_all(&proxy_v2_header(client, dst)?).await?;
                    Ok(stream)
                }
            }
        };
        let result = match tokio::time::timeout(options.timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "upstream handshake timed out")),
        };
        self.counters.count(&result);
        result
    }

    /// A SOCKS5 UDP association: the control connection, and a UDP socket
    /// connected to the proxy's relay address, with `mark`. The association
    /// lasts as long as the control connection.
    pub async fn associate_udp(&self, options: &DialOptions) -> io::Result<UdpAssociation> {
        if !self.carries_udp() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "this upstream carries no UDP"));
        }
        let dial = DialOptions { source: None, ..*options };
        let associate = async {
            let control = transparent::tcp_dial(self.addr, &dial).await?;
            let mut stream = socks5_greet(control, self.credentials.as_ref()).await?;
            // Zeros: where we will send from is not known yet (RFC 1928).
            let unknown = SocketAddr::new(
                if self.addr.is_ipv6() {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                },
                0,
            );
            let relay = stream
                .request(
                    fast_socks5::Socks5Command::UDPAssociate,
                    fast_socks5::util::target_addr::TargetAddr::Ip(unknown),
                )
                .await
                .map_err(socks_error)?;
            let relay = match relay {
                fast_socks5::util::target_addr::TargetAddr::Ip(addr) => addr,
                other => {
                    return Err(io::Error::other(format!("UDP relay at {other}, not an address")));
                }
            };
            // A relay address of 0.0.0.0 means the proxy's own address.
            let relay = if relay.ip().is_unspecified() {
                SocketAddr::new(self.addr.ip(), relay.port())
            } else {
                relay
            };
            let local = crate::host::system::local_addresses().unwrap_or_default();
            if !udp_relay_allowed(relay, self.addr, &local) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the upstream named {relay}, an address of this host, as its UDP relay"
                    ),
                ));
            }
            let socket = transparent::udp_upstream(relay, &dial)?;
            Ok(UdpAssociation { control: stream.get_socket(), socket })
        };
        let result = match tokio::time::timeout(options.timeout, associate).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "UDP ASSOCIATE timed out")),
        };
        self.counters.count(&result);
        result
    }
}

/// Whether the UDP relay address an upstream answered with may be used: a
/// hostile upstream would have the relay send clients' datagrams to this
/// host's own services (loopback or its addresses), which only an upstream
/// on this host may name.
fn udp_relay_allowed(
    relay: SocketAddr,
    upstream: SocketAddr,
    local: &std::collections::HashSet<std::net::IpAddr>,
) -> bool {
    let here = |ip: std::net::IpAddr| {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified() || local.contains(&ip)
    };
    !here(relay.ip()) || here(upstream.ip())
}

fn socks_error(e: fast_socks5::SocksError) -> io::Error {
    match e {
        fast_socks5::SocksError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::ConnectionRefused, other.to_string()),
    }
}

/// The SOCKS5 greeting, with username/password auth if given (RFC 1929).
async fn socks5_greet(
    stream: TcpStream,
    credentials: Option<&Credentials>,
) -> io::Result<fast_socks5::client::Socks5Stream<TcpStream>> {
    let auth = credentials.map(|c| fast_socks5::AuthenticationMethod::Password {
        username: c.username.clone(),
        password: c.password.clone(),
    });
    let config = fast_socks5::client::Config::default();
    fast_socks5::client::Socks5Stream::use_stream(stream, auth, config).await.map_err(socks_error)
}

async fn socks5_connect(
    stream: TcpStream,
    dst: SocketAddr,
    credentials: Option<&Credentials>,
) -> io::Result<TcpStream> {
    let mut socks = socks5_greet(stream, credentials).await?;
    socks
        .request(
            fast_socks5::Socks5Command::TCPConnect,
            fast_socks5::util::target_addr::TargetAddr::Ip(dst),
        )
        .await
        .map_err(socks_error)?;
    Ok(socks.get_socket())
}

/// `CONNECT dst` and its answer; anything but 2xx is a refusal.
async fn http_connect(
    stream: &mut TcpStream,
    dst: SocketAddr,
    credentials: Option<&Credentials>,
) -> io::Result<()> {
    let mut request = format!("CONNECT {dst} HTTP/1.1\r\nHost: {dst}\r\n");
    if let Some(c) = credentials {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        request += &format!("Proxy-Authorization: Basic {token}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes()).await?;
    // The head, byte by byte up to its blank line: what follows is the
    // origin's, and stays in the socket.
    const MAX_HEAD: usize = 16 * 1024;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(io::Error::other("the proxy's answer has no end"));
        }
        let byte = stream.read_u8().await?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code.starts_with('2') && code.len() == 3 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the proxy answered CONNECT with {status_line:?}"),
        ))
    }
}

/// A PROXY v2 header: the client and the original destination, TCP, with
/// a unique id for the connection (PP2_TYPE_UNIQUE_ID) so that both sides'
/// logs can be matched.
fn proxy_v2_header(client: SocketAddr, dst: SocketAddr) -> io::Result<Vec<u8>> {
    use ppp::v2::{Builder, Command, Protocol, Type, Version};
    // Both ends in one family: a v4 client of a v6 destination cannot be.
    let client = match (client, dst) {
        (SocketAddr::V6(c), SocketAddr::V4(_)) => match c.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), c.port()),
            None => return Err(io::Error::other("an IPv6 client of an IPv4 destination")),
        },
        _ => client,
    };
    let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, dst))
        .write_tlv(Type::UniqueId, &id)?
        .build()
}

/// A SOCKS5 UDP association (see [`Upstream::associate_udp`]).
pub struct UdpAssociation {
    /// The control connection: the association ends when it closes.
    pub control: TcpStream,
    /// Connected to the proxy's UDP relay.
    pub socket: UdpSocket,
}

/// Bytes before the payload in a SOCKS5 UDP datagram to `dst`.
pub fn socks5_udp_header(dst: SocketAddr) -> Vec<u8> {
    // An address always encodes; the error is for names too long.
    fast_socks5::new_udp_header(dst).expect("a socket address encodes")
}

/// The payload of a SOCKS5 UDP datagram and who sent it; `None` for a
/// fragment (FRAG != 0, which nobody uses), a name instead of an address,
/// or a malformed datagram.
pub fn socks5_udp_payload(datagram: &[u8]) -> Option<(SocketAddr, &[u8])> {
    use futures::FutureExt as _;
    // fast-socks5's parser is async but only reads the slice: it is ready
    // at its first poll.
    let parsed = fast_socks5::parse_udp_request(datagram).now_or_never()?.ok()?;
    match parsed {
        (0, fast_socks5::util::target_addr::TargetAddr::Ip(from), payload) => Some((from, payload)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_relays_on_this_host_are_refused_unless_the_proxy_is_there() {
        let local: std::collections::HashSet<std::net::IpAddr> =
            ["198.51.100.1".parse().unwrap()].into();
        let (remote, here) =
            ("203.0.113.5:1080".parse().unwrap(), "198.51.100.1:1080".parse().unwrap());
        for (relay, upstream, allowed) in [
            ("203.0.113.5:4000", remote, true),
            ("127.0.0.1:53", remote, false),
            ("[::1]:53", remote, false),
            ("[::ffff:127.0.0.1]:53", remote, false),
            ("198.51.100.1:53", remote, false),
            ("127.0.0.1:4000", here, true),
        ] {
            assert_eq!(
                udp_relay_allowed(relay.parse().unwrap(), upstream, &local),
                allowed,
                "{relay}"
            );
        }
    }

    #[test]
    fn urls() {
        let u = resolved("socks5://alice:p%40ss@192.0.2.1:1080");
        assert_eq!(u.kind, Kind::Socks5);
        assert_eq!(u.addr, "192.0.2.1:1080".parse().unwrap());
        assert_eq!(u.credentials.as_ref().unwrap().password, "p@ss");
        assert_eq!(u.to_string(), "socks5://alice:***@192.0.2.1:1080");
        // Refused URLs never carry their password into the error.
        for bad in [
            "socks5://alice:s3cret@192.0.2.1:99999",
            "alice:s3cret@192.0.2.1",
            "http://a:s3/cr@et@x",
        ] {
            let e = bad.parse::<UpstreamUrl>().unwrap_err().to_string();
            assert!(!e.contains("s3") || !e.contains("cret"), "{e}");
        }
        let u = resolved("http://[2001:db8::1]:3128");
        assert_eq!(u.kind, Kind::HttpConnect);
        assert_eq!(u.addr, "[2001:db8::1]:3128".parse().unwrap());
        let u = resolved("proxy-v2://198.51.100.5:8443");
        assert_eq!(u.kind, Kind::ProxyV2);
        for bad in [
            "ftp://192.0.2.1:21",
            "socks5://192.0.2.1",
            "proxy-v2://u:p@192.0.2.1:1",
            "socks5://192.0.2.1:1080/path",
        ] {
            assert!(bad.parse::<UpstreamUrl>().is_err(), "{bad}");
        }
        let e = "ftp://u:secret@192.0.2.1:21".parse::<UpstreamUrl>().unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        // Parsing looks nothing up (a test sends no DNS query): a name is
        // kept for resolve(), and shown without the password.
        let url: UpstreamUrl = "socks5://u:secret@proxy.example:1080".parse().unwrap();
        assert_eq!(url.host, "proxy.example");
        assert_eq!(url.to_string(), "socks5://u:***@proxy.example:1080");
    }

    fn resolved(text: &str) -> Upstream {
        text.parse::<UpstreamUrl>().and_then(UpstreamUrl::resolve).unwrap()
    }

    #[test]
    fn udp_header_round_trip() {
        for dst in ["198.51.100.10:53", "[2001:db8::10]:53"] {
            let dst: SocketAddr = dst.parse().unwrap();
            let mut datagram = socks5_udp_header(dst);
            datagram.extend_from_slice(b"hello");
            assert_eq!(socks5_udp_payload(&datagram), Some((dst, &b"hello"[..])));
        }
        assert_eq!(socks5_udp_payload(&[0, 0, 1, 1, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(socks5_udp_payload(&[0, 0, 0, 1, 0]), None);
    }

    #[test]
    fn proxy_v2_header_parses_back() {
        let client: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        let dst: SocketAddr = "198.51.100.10:80".parse().unwrap();
        let bytes = proxy_v2_header(client, dst).unwrap();
        let header = ppp::v2::Header::try_from(&bytes[..]).unwrap();
        assert_eq!(header.addresses, ppp::v2::Addresses::from((client, dst)),);
    }
}
