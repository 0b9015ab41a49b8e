//! Networking a provider client takes from the daemon without knowing why: a DNS resolver that
//! refuses addresses no provider may be reached at (the ledger's Redis, the daemon itself).

use std::sync::Arc;

/// A DNS resolver for a provider client. The daemon's refuses reserved addresses when the client
/// connects, so that a provider's name re-pointed after start-up cannot reach them.
#[derive(Clone)]
pub struct DnsResolver(pub Arc<dyn reqwest::dns::Resolve>);

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver(..)")
    }
}

impl reqwest::dns::Resolve for DnsResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.0.resolve(name)
    }
}

/// `builder` with `resolver` installed, when there is one.
pub fn with_resolver(builder: reqwest::ClientBuilder, resolver: Option<&DnsResolver>) -> reqwest::ClientBuilder {
    match resolver {
        // The client takes a sized resolver: the wrapper, which forwards to the shared one.
        Some(resolver) => builder.dns_resolver(Arc::new(resolver.clone())),
        None => builder,
    }
}

/// Why a provider's answer could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The answer declared, or turned out to have, more than `limit` bytes.
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The connection failed or timed out while the body was read.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// Reads a provider's whole answer, at most `limit` bytes: every provider client reads its
/// answers through this one function. An answer whose declared length is larger is refused
/// before a byte of it is read, and a streamed one as soon as it passes the limit, so at most
/// `limit` bytes are ever kept.
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(ReadError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(ReadError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP/1.1 server that answers `body` in chunks of `chunk` bytes without a
    /// `Content-Length`, so that only the bytes read can tell the size.
    async fn chunked_server(body: Vec<u8>, chunk: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
            for part in body.chunks(chunk) {
                answer.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                answer.extend_from_slice(part);
                answer.extend_from_slice(b"\r\n");
            }
            answer.extend_from_slice(b"0\r\n\r\n");
            let _ = socket.write_all(&answer).await;
        });
        format!("http://{address}/")
    }

    async fn get(url: &str) -> reqwest::Response {
        reqwest::Client::new().get(url).send().await.expect("answers")
    }

    #[tokio::test]
    async fn an_answer_within_the_limit_is_read_whole() {
        let body = vec![b'a'; 1000];
        let url = chunked_server(body.clone(), 100).await;
        assert_eq!(read_limited(get(&url).await, 1000).await.expect("reads"), body);
    }

    #[tokio::test]
    async fn a_streamed_answer_past_the_limit_is_refused() {
        let url = chunked_server(vec![b'a'; 1001], 100).await;
        let error = read_limited(get(&url).await, 1000).await.expect_err("too large");
        assert!(matches!(error, ReadError::TooLarge { limit: 1000 }), "{error:?}");
        assert_eq!(error.to_string(), "the answer is larger than 1000 bytes");
    }

    #[tokio::test]
    async fn a_declared_length_past_the_limit_is_refused_before_reading() {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::any())
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_bytes(vec![b'a'; 1001]))
            .mount(&server)
            .await;
        let response = get(&server.uri()).await;
        assert_eq!(response.content_length(), Some(1001));
        let error = read_limited(response, 1000).await.expect_err("too large");
        assert!(matches!(error, ReadError::TooLarge { limit: 1000 }), "{error:?}");
    }
}
