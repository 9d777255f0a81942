//! Upstream URLs: parsed without I/O, resolved when asked, and never
//! printed with their password.

use super::*;

/// Why an upstream URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("upstream {url:?}: {why}")]
pub struct BadUpstream {
    url: String,
    why: String,
}

/// An upstream URL as given: checked, but its host not yet looked up, so
/// that parsing does no I/O. [`UpstreamUrl::resolve`] makes the
/// [`Upstream`] the relay dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// The protocol.
    pub kind: Kind,
    /// The host: an address or a name.
    pub host: String,
    /// The port.
    pub port: u16,
    /// Its credentials, if it wants them (SOCKS5 and HTTP).
    pub credentials: Option<Credentials>,
}

impl UpstreamUrl {
    /// Looks the host up (once, now: the relay dials an address) and makes
    /// the upstream.
    pub fn resolve(self) -> Result<Upstream, BadUpstream> {
        let bad = |why: String| BadUpstream { url: self.to_string(), why };
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| bad(format!("resolving {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| bad("the host has no address".into()))?;
        let Self { kind, credentials, .. } = self;
        Ok(Upstream { kind, addr, credentials, counters: Arc::default() })
    }
}

impl fmt::Display for UpstreamUrl {
    /// The URL, with the password left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_url(f, self.kind, self.credentials.as_ref())?;
        match self.host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => write!(f, "[{v6}]:{}", self.port),
            Err(_) => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = BadUpstream;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BadUpstream { url: redact(text), why: why.to_owned() };
        let url = ::url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let kind = match url.scheme() {
            "socks5" => Kind::Socks5,
            "http" => Kind::HttpConnect,
            "proxy-v2" => Kind::ProxyV2,
            _ => return Err(bad("the scheme must be socks5, http or proxy-v2")),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("give only [user:pass@]HOST:PORT after the scheme"));
        }
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let port = url.port().ok_or_else(|| bad("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let decode = |s: &str| {
            percent_decode(s)
                .ok_or_else(|| bad("the user or password is not valid percent-encoded UTF-8"))
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some(Credentials {
                username: decode(user)?,
                password: decode(password.unwrap_or(""))?,
            }),
        };
        if credentials.is_some() && kind == Kind::ProxyV2 {
            return Err(bad("proxy-v2 takes no credentials"));
        }
        if let Some(c) = &credentials
            && kind == Kind::Socks5
            && (c.username.len() > 255 || c.password.len() > 255)
        {
            return Err(bad("SOCKS5 credentials are at most 255 bytes each"));
        }
        Ok(Self { kind, host, port, credentials })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|s| s.into_owned())
}

/// The URL without its password, for messages.
/// `text` with whatever stands before its last `@` (after the scheme) cut
/// to the user name: a password is never printed, whether the URL parses
/// or not.
fn redact(text: &str) -> String {
    let (scheme, rest) = match text.find("://") {
        Some(at) => text.split_at(at + 3),
        None => ("", text),
    };
    match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}{user}:***{}", &rest[at..])
        }
        None => text.to_owned(),
    }
}

impl fmt::Display for Upstream {
    /// The URL, with the password left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_url(f, self.kind, self.credentials.as_ref())?;
        write!(f, "{}", self.addr)
    }
}

/// A URL's scheme and user, up to its host.
fn write_url(
    f: &mut fmt::Formatter<'_>,
    kind: Kind,
    credentials: Option<&Credentials>,
) -> fmt::Result {
    let scheme = match kind {
        Kind::Socks5 => "socks5",
        Kind::HttpConnect => "http",
        Kind::ProxyV2 => "proxy-v2",
    };
    write!(f, "{scheme}://")?;
    if let Some(c) = credentials {
        write!(f, "{}:***@", c.username)?;
    }
    Ok(())
}
