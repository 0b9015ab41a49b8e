//! The HTTP client that talks to resource servers on the agents' behalf.
//!
//! It connects only to checked destinations (see [`super::destination`]): its resolver refuses
//! non-public addresses, it ignores proxy settings from the environment (a proxy would resolve
//! the host itself, unchecked) and it follows no redirect (a redirect would both reach an
//! unchecked URL and carry a live payment authorization to it; the 3xx goes back to the agent).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use adapters::net::{read_limited, ReadError};
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;
use reqwest::{Method, StatusCode};

use super::destination::{refused_in, CheckedResolver, DestinationRefused, Destinations};

/// A request to send upstream, as the agent asked for it (headers already filtered).
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A complete upstream response.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// An answer rebuilt from its stored parts (a replayed purchase); headers that are not valid
    /// any more are left out.
    pub fn from_parts(status: u16, headers: Vec<(String, String)>, body: Bytes) -> Option<Answer> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                map.append(name, value);
            }
        }
        Some(Answer { status: StatusCode::from_u16(status).ok()?, headers: map, body })
    }

    /// Whether the server asks to be paid (HTTP 402).
    pub fn asks_payment(&self) -> bool {
        asks_payment(self.status)
    }
}

/// Whether a server's status asks to be paid (HTTP 402).
pub fn asks_payment(status: StatusCode) -> bool {
    status == StatusCode::PAYMENT_REQUIRED
}

#[derive(Debug)]
pub enum UpstreamError {
    /// The destination resolved to an address that may not be fetched; nothing was sent.
    Refused(DestinationRefused),
    /// No response came back: connection refused or reset, TLS failure, or the timeout passed
    /// before the response head.
    NoResponse { timed_out: bool, detail: String },
    /// The response head came back but not its body: larger than the limit, cut off, or slow.
    Body { status: StatusCode, headers: HeaderMap, too_large: bool, detail: String },
}

pub struct Upstream {
    /// For every port no reserved address has.
    client: reqwest::Client,
    /// One client per reserved port, made on first use, whose resolver refuses the reserved
    /// addresses of that port (the listen address is only known after start-up).
    reserved_port_clients: std::sync::Mutex<HashMap<u16, reqwest::Client>>,
    destinations: Destinations,
    connect_timeout: Duration,
    max_response_bytes: usize,
}

impl Upstream {
    pub fn build(
        destinations: Destinations,
        connect_timeout: Duration,
        max_response_bytes: usize,
    ) -> Result<Upstream, reqwest::Error> {
        let client = client(destinations.clone(), None, connect_timeout)?;
        Ok(Upstream {
            client,
            reserved_port_clients: std::sync::Mutex::new(HashMap::new()),
            destinations,
            connect_timeout,
            max_response_bytes,
        })
    }

    /// The client for a request to `url`: the port-aware one when a reserved address has its port.
    fn client_for(&self, url: &Url) -> Result<reqwest::Client, UpstreamError> {
        let Some(port) = url.port_or_known_default().filter(|port| self.destinations.reserved().has_port(*port)) else {
            return Ok(self.client.clone());
        };
        let no_client = |detail: String| UpstreamError::NoResponse { timed_out: false, detail };
        let mut clients = self.reserved_port_clients.lock().map_err(|_| no_client("client cache poisoned".into()))?;
        if let Some(client) = clients.get(&port) {
            return Ok(client.clone());
        }
        let client = client(self.destinations.clone(), Some(port), self.connect_timeout)
            .map_err(|err| no_client(describe(err)))?;
        clients.insert(port, client.clone());
        Ok(client)
    }

    /// Sends the request (with the payment header, if any) and reads the whole response, within
    /// `timeout` from the first byte sent to the last byte of the body.
    pub async fn send(
        &self,
        request: &Outgoing,
        payment: Option<&(HeaderName, HeaderValue)>,
        timeout: Duration,
    ) -> Result<Answer, UpstreamError> {
        let mut builder = self
            .client_for(&request.url)?
            .request(request.method.clone(), request.url.clone())
            .headers(request.headers.clone())
            .timeout(timeout);
        if let Some((name, value)) = payment {
            builder = builder.header(name, value);
        }
        if !request.body.is_empty() {
            builder = builder.body(request.body.clone());
        }
        let mut response = builder.send().await.map_err(|err| match refused_in(&err) {
            Some(refused) => UpstreamError::Refused(refused),
            None => UpstreamError::NoResponse { timed_out: err.is_timeout(), detail: describe(err) },
        })?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let limit = self.max_response_bytes;
        let too_large = |headers: HeaderMap| UpstreamError::Body {
            status,
            headers,
            too_large: true,
            detail: format!("the upstream response body is larger than {limit} bytes"),
        };
        match read_limited(response, limit).await {
            Ok(body) => Ok(Answer { status, headers, body: Bytes::from(body) }),
            Err(ReadError::TooLarge { .. }) => Err(too_large(headers)),
            Err(ReadError::Transport(err)) => {
                let timed_out = err.is_timeout();
                let detail = describe(err);
                let detail = if timed_out { format!("timed out reading the body: {detail}") } else { detail };
                Err(UpstreamError::Body { status, headers, too_large: false, detail })
            }
        }
    }
}

fn client(
    destinations: Destinations,
    port: Option<u16>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(CheckedResolver { destinations, port }))
        .connect_timeout(connect_timeout)
        .user_agent(concat!("spendcap/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// An error's message and causes, without the URL (its query may hold the agent's secrets, and
/// the message goes into logs).
pub(crate) fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and framing headers that each connection sets itself.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether an agent's request header is passed on to the resource server. Not passed: hop-by-hop
/// and framing headers, `Host` (the URL's), `Accept-Encoding` (the daemon reads bodies as sent),
/// payment headers (only the daemon pays) and spendcap's own `X-Spendcap-*` headers.
pub fn forwarded_request_header(name: &HeaderName) -> bool {
    !(HOP_BY_HOP.contains(name)
        || [header::HOST, header::CONTENT_LENGTH, header::ACCEPT_ENCODING, header::EXPECT].contains(name)
        || [adapters::x402::PAYMENT_SIGNATURE, adapters::x402::X_PAYMENT].contains(name)
        || name.as_str().starts_with("x-spendcap-"))
}

/// Whether a resource server's response header is passed back to the agent: all but hop-by-hop
/// and framing headers, and any `X-Spendcap-*` header (only the daemon speaks for spendcap).
pub fn returned_response_header(name: &HeaderName) -> bool {
    !(HOP_BY_HOP.contains(name) || *name == header::CONTENT_LENGTH || name.as_str().starts_with("x-spendcap-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spendcap_payment_and_hop_by_hop_headers_stay_home() {
        for name in ["authorization", "accept", "content-type", "cookie", "idempotency-key", "user-agent"] {
            assert!(forwarded_request_header(&HeaderName::from_static(name)), "{name} is forwarded");
        }
        for name in ["host", "connection", "transfer-encoding", "x-spendcap-task", "payment-signature", "x-payment"] {
            assert!(!forwarded_request_header(&HeaderName::from_static(name)), "{name} is not forwarded");
        }
        assert!(returned_response_header(&HeaderName::from_static("payment-response")));
        assert!(returned_response_header(&header::CONTENT_TYPE));
        assert!(!returned_response_header(&HeaderName::from_static("x-spendcap-amount-micros")));
        assert!(!returned_response_header(&header::TRANSFER_ENCODING));
    }
}
