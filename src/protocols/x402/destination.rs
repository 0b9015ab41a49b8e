//! Where the daemon may send an agent's request: public addresses only, unless allow-listed.
//!
//! A daemon that fetches URLs for agents is a server-side request forgery risk: an agent (or a
//! prompt it read) could point it at the cloud metadata service, the admin port of a database or
//! the daemon's own Redis. So every destination is checked, and checked where it is used:
//!
//! - an IP literal in the URL is checked before the request is built ([`check_url`]);
//! - a host name is resolved exactly once per connection, by [`CheckedResolver`], which refuses
//!   the name when any of its addresses is not allowed. The HTTP client connects only to the
//!   addresses the resolver returned, so a DNS answer that changes between the check and the
//!   connection (DNS rebinding) cannot slip through;
//! - the ledger's Redis nodes and the daemon's own listen address are refused whatever the
//!   allow-list says ([`super::super::reserved`]), by address and port, for IP literals here and
//!   for resolved names at connection time (the client of a reserved port resolves with that port
//!   in mind, see `upstream.rs`);
//! - redirects are not followed and proxies from the environment are not used (see
//!   `upstream.rs`), so no request ever goes to a host that was not checked.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use crate::protocols::reserved::Reserved;

/// An IP network written `10.0.0.0/8`, `fd00::/8`, or a single address (`127.0.0.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, fd00::/8)")]
pub struct BadAddressRange(pub String);

impl AddressRange {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> AddressRange {
        AddressRange { network: IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> AddressRange {
        let [a, b, c, d, e, f, g, h] = segments;
        AddressRange { network: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                same_prefix(u128::from(u32::from(network)), u128::from(u32::from(ip)), self.prefix, 32)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => same_prefix(u128::from(network), u128::from(ip), self.prefix, 128),
            _ => false,
        }
    }
}

fn same_prefix(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    let shift = u32::from(bits.saturating_sub(prefix));
    // A shift by the whole width (prefix 0) matches everything.
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

impl FromStr for AddressRange {
    type Err = BadAddressRange;

    fn from_str(text: &str) -> Result<AddressRange, BadAddressRange> {
        let bad = || BadAddressRange(text.to_owned());
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = canonical(address.parse::<IpAddr>().map_err(|_| bad())?);
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                digits.parse::<u8>().ok().filter(|p| *p <= width).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        Ok(AddressRange { network, prefix })
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are the IPv4 address they map.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Addresses that are not the public internet: loopback, private, link-local (the cloud metadata
/// service), carrier-grade NAT, multicast, reserved and documentation ranges, and the IPv6
/// transition prefixes that can smuggle any IPv4 address.
const NOT_PUBLIC: [AddressRange; 28] = [
    AddressRange::v4(0, 0, 0, 0, 8),
    AddressRange::v4(10, 0, 0, 0, 8),
    AddressRange::v4(100, 64, 0, 0, 10),
    AddressRange::v4(127, 0, 0, 0, 8),
    AddressRange::v4(169, 254, 0, 0, 16),
    AddressRange::v4(172, 16, 0, 0, 12),
    AddressRange::v4(192, 0, 0, 0, 24),
    AddressRange::v4(192, 0, 2, 0, 24),
    AddressRange::v4(192, 88, 99, 0, 24),
    AddressRange::v4(192, 168, 0, 0, 16),
    AddressRange::v4(198, 18, 0, 0, 15),
    AddressRange::v4(198, 51, 100, 0, 24),
    AddressRange::v4(203, 0, 113, 0, 24),
    AddressRange::v4(224, 0, 0, 0, 4),
    AddressRange::v4(240, 0, 0, 0, 4),
    AddressRange::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
    AddressRange::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
    // IPv4-compatible addresses (deprecated); mapped ones are handled by `canonical`.
    AddressRange::v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
    AddressRange::v6([0x0064, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
    AddressRange::v6([0x0100, 0, 0, 0, 0, 0, 0, 0], 64),
    // Teredo and 6to4 embed an IPv4 address that is not worth decoding: refused whole.
    AddressRange::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
    AddressRange::v6([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32),
    AddressRange::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
    AddressRange::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    AddressRange::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    AddressRange::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    AddressRange::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    AddressRange::v4(255, 255, 255, 255, 32),
];

/// The NAT64 well-known prefix `64:ff9b::/96` embeds a public IPv4 address in IPv6-only
/// networks; it is as public as the address it embeds.
const NAT64: AddressRange = AddressRange::v6([0x0064, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

fn is_public(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    if let IpAddr::V6(v6) = ip {
        if NAT64.contains(ip) {
            let [.., a, b, c, d] = v6.octets();
            return is_public(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        }
    }
    !NOT_PUBLIC.iter().any(|range| range.contains(ip))
}

/// The destinations the daemon may connect to: public addresses, plus the allow-listed ranges,
/// minus the reserved addresses (Redis, the daemon itself) whatever the allow-list says.
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    allowed: Arc<Vec<AddressRange>>,
    reserved: Reserved,
}

impl Destinations {
    pub fn new(allowed: Vec<AddressRange>) -> Destinations {
        Destinations { allowed: Arc::new(allowed), reserved: Reserved::default() }
    }

    pub fn with_reserved(self, reserved: Reserved) -> Destinations {
        Destinations { reserved, ..self }
    }

    pub fn reserved(&self) -> &Reserved {
        &self.reserved
    }

    /// Whether `ip` is a destination at all (public or allow-listed), on any port.
    pub fn allows(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed.iter().any(|range| range.contains(ip))
    }

    /// Why a connection to `ip` on `port` is refused, if it is.
    pub fn refuses(&self, host: &str, ip: IpAddr, port: Option<u16>) -> Option<DestinationRefused> {
        let refused = |reserved| Some(DestinationRefused { host: host.to_owned(), ip, reserved });
        if port.is_some_and(|port| self.reserved.covers(ip, port)) {
            return refused(true);
        }
        if !self.allows(ip) {
            return refused(false);
        }
        None
    }
}

/// A destination the policy refuses. Travels through the HTTP client's error chain when the
/// resolver refuses a name, so that the caller can tell it from a network failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host} resolves to {ip}, which {}", if *.reserved { "is the ledger's Redis or this daemon (never fetched)" } else { "is not a public address and not allow-listed" })]
pub struct DestinationRefused {
    pub host: String,
    pub ip: IpAddr,
    /// The address (and port) is a Redis node of the ledger or the daemon's listen address.
    pub reserved: bool,
}

/// Why a URL cannot be fetched at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not an absolute URL: {0}")]
    Malformed(String),
    #[error("only http and https URLs can be fetched")]
    Scheme,
    #[error("URLs with user names or passwords are not fetched; send credentials as headers")]
    Credentials,
    #[error("URLs are limited to {0} bytes")]
    TooLong(usize),
    #[error(transparent)]
    Refused(#[from] DestinationRefused),
}

pub const MAX_URL_BYTES: usize = 8 * 1024;

/// Parses and checks a URL to fetch. IP literals are checked here (the HTTP client does not
/// resolve them); host names are checked by [`CheckedResolver`] when the client connects.
pub fn check_url(text: &str, destinations: &Destinations) -> Result<Url, UrlError> {
    if text.len() > MAX_URL_BYTES {
        return Err(UrlError::TooLong(MAX_URL_BYTES));
    }
    let url = Url::parse(text).map_err(|err| UrlError::Malformed(err.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    let host = url.host_str().ok_or_else(|| UrlError::Malformed("the URL has no host".to_owned()))?;
    // The URL parser has already normalised IPv4 spellings (`0x7f000001`, `2130706433`) to
    // dotted quads, and writes IPv6 literals in brackets.
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).parse::<IpAddr>().ok();
    if let Some(refused) = literal.and_then(|ip| destinations.refuses(&ip.to_string(), ip, url.port_or_known_default()))
    {
        return Err(refused.into());
    }
    Ok(url)
}

/// The HTTP client's resolver: one lookup per connection, refused whole when any address is not
/// allowed, and the connection is made to exactly the addresses returned here. The resolver does
/// not learn the port it resolves for, so a client that connects to a reserved port (Redis's,
/// the daemon's) has its own resolver that knows it (`port`); the others have `None`, and reach
/// no reserved address because none has their port.
pub struct CheckedResolver {
    pub destinations: Destinations,
    pub port: Option<u16>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let destinations = self.destinations.clone();
        let port = self.port;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(refused) = addrs.iter().find_map(|addr| destinations.refuses(&host, addr.ip(), port)) {
                return Err(Box::new(refused) as _);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The same resolver for reqwest 0.13, the HTTP client of rmcp's streamable-HTTP transport (the
/// daemon's client of upstream MCP servers).
impl reqwest013::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest013::dns::Name) -> reqwest013::dns::Resolving {
        let destinations = self.destinations.clone();
        let port = self.port;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(refused) = addrs.iter().find_map(|addr| destinations.refuses(&host, addr.ip(), port)) {
                return Err(Box::new(refused) as _);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest013::dns::Addrs)
        })
    }
}

/// Finds a [`DestinationRefused`] in an error's source chain (the HTTP client wraps what the
/// resolver returned in two or three layers).
pub fn refused_in(err: &(dyn std::error::Error + 'static)) -> Option<DestinationRefused> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = current {
        if let Some(refused) = err.downcast_ref::<DestinationRefused>() {
            return Some(refused.clone());
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn private_loopback_link_local_and_smuggled_addresses_are_not_public() {
        for text in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(text)), "{text} must not count as public");
        }
        for text in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"] {
            assert!(is_public(ip(text)), "{text} is public");
        }
    }

    #[test]
    fn allow_list_entries_are_addresses_or_networks() {
        let single: AddressRange = "127.0.0.1".parse().expect("address");
        assert!(single.contains(ip("127.0.0.1")));
        assert!(single.contains(ip("::ffff:127.0.0.1")));
        assert!(!single.contains(ip("127.0.0.2")));
        let network: AddressRange = "10.0.0.0/8".parse().expect("network");
        assert!(network.contains(ip("10.200.0.1")) && !network.contains(ip("11.0.0.1")));
        let v6: AddressRange = "fd00::/8".parse().expect("v6 network");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let everything: AddressRange = "0.0.0.0/0".parse().expect("all of IPv4");
        assert!(everything.contains(ip("192.168.0.1")));
        for bad in ["", "localhost", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1", "::1/129", "1.2.3.4/8/9"] {
            assert!(bad.parse::<AddressRange>().is_err(), "{bad:?}");
        }
        let destinations = Destinations::new(vec![single]);
        assert!(destinations.allows(ip("127.0.0.1")));
        assert!(!destinations.allows(ip("127.0.0.2")));
        assert!(destinations.allows(ip("8.8.8.8")));
    }

    #[test]
    fn urls_are_checked_before_anything_is_sent() {
        let none = Destinations::default();
        let code = |text: &str| check_url(text, &none).map(|_| ()).map_err(|e| e.to_string());
        assert!(code("https://api.example.com/weather?city=Paris").is_ok());
        assert!(code("http://8.8.8.8/").is_ok());
        for refused in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://[::ffff:10.0.0.1]/",
        ] {
            assert!(
                matches!(check_url(refused, &none), Err(UrlError::Refused(_))),
                "{refused} must be refused: {:?}",
                check_url(refused, &none)
            );
        }
        assert!(matches!(check_url("ftp://example.com/", &none), Err(UrlError::Scheme)));
        assert!(matches!(check_url("file:///etc/passwd", &none), Err(UrlError::Scheme)));
        assert!(matches!(check_url("https://user:pw@example.com/", &none), Err(UrlError::Credentials)));
        assert!(matches!(check_url("/relative", &none), Err(UrlError::Malformed(_))));
        let allowed = Destinations::new(vec!["127.0.0.1".parse().expect("address")]);
        assert!(check_url("http://127.0.0.1:8080/", &allowed).is_ok());
    }
}
