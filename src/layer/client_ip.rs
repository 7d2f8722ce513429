//! Which address a request comes from: for usage events, the miss budget and network
//! allowlists.
//!
//! Only what this process can vouch for counts. The peer address is the connection's;
//! a forwarded address is believed only as far as a chain of trusted proxies vouches
//! for it: walking `Forwarded` (or, without it, `X-Forwarded-For`) from the right, each
//! hop added by a trusted proxy is skipped, and the first address not in a trusted
//! network is the client. The leftmost entry, which the client itself may have written,
//! is never taken on its own word.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderName, Request};
use ipnet::IpNet;

/// Where the client address comes from.
#[derive(Debug, Clone, Default)]
pub(super) enum ClientIp {
    /// Not configured: usage events record none; the budget and allowlists use the peer.
    #[default]
    None,
    /// The peer address (axum's `ConnectInfo`).
    Peer,
    /// The last address in a header set by a proxy the operator trusts.
    Header(HeaderName),
    /// The peer, or the rightmost forwarded address not in these networks when the
    /// peer is in them.
    TrustedProxies(Arc<[IpNet]>),
}

/// Longest forwarding header read: a longer one is not believed at all.
const MAX_FORWARDED_LEN: usize = 4096;

impl ClientIp {
    /// The client address as configured: what usage events record.
    pub(super) fn of<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        match self {
            ClientIp::None => None,
            ClientIp::Peer => peer_ip(req),
            ClientIp::Header(name) => req
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse().ok()),
            ClientIp::TrustedProxies(trusted) => through_proxies(req, trusted),
        }
    }

    /// The address a request is judged by: as configured, else the peer address when the
    /// server provides one. The miss budget and network allowlists use it; it stays in
    /// memory, so unlike usage events it needs no opt-in.
    pub(super) fn trusted<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        match self {
            ClientIp::None => peer_ip(req),
            configured => configured.of(req),
        }
    }
}

/// The rightmost address not in `trusted`, starting at the peer.
fn through_proxies<B>(req: &Request<B>, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer_ip(req)?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let hops = forwarded_hops(req)?;
    let mut client = peer;
    for hop in hops.iter().rev() {
        // A hop a trusted proxy wrote but that is no address (`unknown`, an obfuscated
        // name): nothing to the left of it can be vouched for.
        let ip = (*hop)?;
        client = ip;
        if !is_trusted(&ip) {
            return Some(ip);
        }
    }
    // Every hop was a trusted proxy: the leftmost is as far as the chain tells.
    Some(client)
}

/// The addresses of `Forwarded`'s `for=` parameters, or else of `X-Forwarded-For`, in
/// order (every header line, left to right); `None` for an address that is not one.
/// `None` overall when a header is too long or not text.
fn forwarded_hops<B>(req: &Request<B>) -> Option<Vec<Option<IpAddr>>> {
    let headers = req.headers();
    let (name, is_forwarded) = if headers.contains_key(http::header::FORWARDED) {
        (http::header::FORWARDED, true)
    } else {
        (HeaderName::from_static("x-forwarded-for"), false)
    };
    let mut hops = Vec::new();
    let mut total = 0;
    for value in headers.get_all(&name) {
        total += value.len();
        if total > MAX_FORWARDED_LEN {
            return None;
        }
        let text = value.to_str().ok()?;
        for element in text.split(',') {
            if is_forwarded {
                // `for=192.0.2.60;proto=https;by=…`: the element's `for` pair, if any.
                let node = element.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    key.trim().eq_ignore_ascii_case("for").then(|| value.trim())
                });
                match node {
                    Some(node) => hops.push(parse_node(node)),
                    None => hops.push(None),
                }
            } else {
                hops.push(parse_node(element.trim()));
            }
        }
    }
    Some(hops)
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:8080`,
/// `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim_matches('"');
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    // `a.b.c.d:port`: an IPv6 address without brackets has more than one colon.
    match node.rsplit_once(':') {
        Some((ip, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !ip.contains(':') => ip.parse().ok(),
        _ => None,
    }
}

#[cfg(feature = "axum")]
fn peer_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())
}

#[cfg(not(feature = "axum"))]
fn peer_ip<B>(_: &Request<B>) -> Option<IpAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder();
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(()).unwrap();
        let addr: std::net::SocketAddr = format!("{peer}:443").parse().unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
        req
    }

    fn trusted(nets: &[&str]) -> ClientIp {
        ClientIp::TrustedProxies(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let spoof = [("x-forwarded-for", "1.2.3.4")];
        // An untrusted peer's header is ignored.
        assert_eq!(proxies.trusted(&request("198.51.100.7", &spoof)), ip("198.51.100.7"));
        // A trusted peer: the rightmost untrusted hop, never the client-written leftmost.
        let chain = [("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")];
        assert_eq!(proxies.trusted(&request("10.0.0.2", &chain)), ip("203.0.113.9"));
        let lines = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "203.0.113.9")];
        assert_eq!(proxies.trusted(&request("10.0.0.2", &lines)), ip("203.0.113.9"));
        // `Forwarded` wins over X-Forwarded-For; quoted IPv6 with a port.
        let both = [
            ("forwarded", r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https"#),
            ("x-forwarded-for", "198.51.100.1"),
        ];
        assert_eq!(proxies.trusted(&request("10.0.0.2", &both)), ip("2001:db8::7"));
        // `unknown` where a trusted proxy would have written the client: no address.
        let unknown = [("forwarded", "for=203.0.113.9, for=unknown")];
        assert_eq!(proxies.trusted(&request("10.0.0.2", &unknown)), None);
        // No header from a trusted peer: the peer itself.
        assert_eq!(proxies.trusted(&request("10.0.0.2", &[])), ip("10.0.0.2"));
        // A header too long to be believed.
        let long = "1.1.1.1, ".repeat(600);
        assert_eq!(proxies.trusted(&request("10.0.0.2", &[("x-forwarded-for", &long)])), None);
    }

    #[test]
    fn nodes_parse_in_every_form_headers_write() {
        for (node, want) in [
            ("192.0.2.1", ip("192.0.2.1")),
            ("192.0.2.1:8080", ip("192.0.2.1")),
            ("\"[2001:db8::1]:4711\"", ip("2001:db8::1")),
            ("[2001:db8::1]", ip("2001:db8::1")),
            ("2001:db8::1", ip("2001:db8::1")),
            ("_hidden", None),
            ("unknown", None),
            ("1.2.3.4:port", None),
        ] {
            assert_eq!(parse_node(node), want, "{node}");
        }
    }
}
