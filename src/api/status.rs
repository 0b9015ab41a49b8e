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
    fn answers_stored_by_status_before_the_split_map_back_to_the_same_kinds() {
        for (status, kind) in crate::outcome::STORED_STATUS {
            assert_eq!(of(kind).as_u16(), status, "{kind:?}");
        }
        // A record the previous release wrote for an ACP conflict replays as that conflict.
        let old = r#"{"status":409,"body":{"code":"acp_total_changed","detail":"changed","hold_id":"hd_x"}}"#;
        let replayed = crate::outcome::Reply::replay(old).expect("replays");
        assert_eq!(
            (replayed.failure.map(of), &replayed.body["code"]),
            (Some(StatusCode::CONFLICT), &json_str("acp_total_changed"))
        );
        assert_eq!(replayed.body["replayed"], serde_json::Value::Bool(true));
        let ok = crate::outcome::Reply::replay(r#"{"status":200,"body":{"status":"completed"}}"#).expect("replays");
        assert_eq!(ok.failure, None);
    }

    fn json_str(text: &str) -> serde_json::Value {
        serde_json::Value::String(text.to_owned())
    }

    #[test]
    fn the_table_names_every_kind_once_and_agrees_with_of() {
        for kind in Kind::ALL {
            let rows: Vec<_> = TABLE.iter().filter(|(k, _)| *k == kind).collect();
            assert_eq!(rows.len(), 1, "{kind:?}");
            assert_eq!(rows[0].1, of(kind), "{kind:?}");
        }
    }
}
