//! The HTTP face's one translation of failures: every [`Kind`] of failure the core and the
//! protocol flows report becomes one status code here, and nowhere else. The README's table
//! ("Error codes and HTTP statuses") is this table; `tests/it/layering.rs` checks they agree.

use axum::http::StatusCode;

use crate::outcome::Kind;

/// The status code of each kind of failure.
pub const TABLE: [(Kind, StatusCode); 15] = [
    (Kind::Malformed, StatusCode::BAD_REQUEST),
    (Kind::Unauthenticated, StatusCode::UNAUTHORIZED),
    (Kind::Refused, StatusCode::PAYMENT_REQUIRED),
    (Kind::Forbidden, StatusCode::FORBIDDEN),
    (Kind::NotFound, StatusCode::NOT_FOUND),
    (Kind::MethodNotAllowed, StatusCode::METHOD_NOT_ALLOWED),
    (Kind::Conflict, StatusCode::CONFLICT),
    (Kind::TooLarge, StatusCode::PAYLOAD_TOO_LARGE),
    (Kind::UnsupportedMediaType, StatusCode::UNSUPPORTED_MEDIA_TYPE),
    (Kind::Invalid, StatusCode::UNPROCESSABLE_ENTITY),
    (Kind::Internal, StatusCode::INTERNAL_SERVER_ERROR),
    (Kind::Provider, StatusCode::BAD_GATEWAY),
    (Kind::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
    (Kind::ProviderTimeout, StatusCode::GATEWAY_TIMEOUT),
    (Kind::ApprovalRequired, StatusCode::ACCEPTED),
];

/// The status a failure of `kind` is answered with.
pub fn of(kind: Kind) -> StatusCode {
    match kind {
        Kind::Malformed => StatusCode::BAD_REQUEST,
        Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
        Kind::Refused => StatusCode::PAYMENT_REQUIRED,
        Kind::Forbidden => StatusCode::FORBIDDEN,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Kind::Conflict => StatusCode::CONFLICT,
        Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Kind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Kind::Provider => StatusCode::BAD_GATEWAY,
        Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Kind::ProviderTimeout => StatusCode::GATEWAY_TIMEOUT,
        Kind::ApprovalRequired => StatusCode::ACCEPTED,
    }
}

/// A stored or fresh whole answer of a flow: 200 with its body, or its failure's status.
pub fn reply(reply: crate::outcome::Reply) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = reply.failure.map_or(StatusCode::OK, of);
    (status, axum::Json(reply.body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_kind_once_and_agrees_with_of() {
        for kind in Kind::ALL {
            let rows: Vec<_> = TABLE.iter().filter(|(k, _)| *k == kind).collect();
            assert_eq!(rows.len(), 1, "{kind:?}");
            assert_eq!(rows[0].1, of(kind), "{kind:?}");
        }
    }
}
