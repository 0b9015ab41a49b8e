//! A simulated MPP provider: a resource server that asks for a `stripe` charge with the `Payment`
//! HTTP authentication scheme (HMAC-bound challenge ids, as the official SDKs make them), and the
//! PSP that mints Shared Payment Tokens. A paid request is accepted only with a credential for an
//! unaltered, unexpired challenge of this server whose token the PSP minted, for this seller,
//! covering the price and not expired; the charge is idempotent per (challenge, token), like
//! Stripe's, and answered with a `Payment-Receipt`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use adapters::mpp::session::{
    open_digest, parse_open_transaction, recover, voucher_digest, SessionPayload, PATH_USD, TEMPO_CHAIN_ID,
};
use adapters::mpp::{
    format_receipt, format_www_authenticate, parse_authorization, Base64UrlJson, PaymentChallenge, Receipt, SPT_PATH,
};
use adapters::x402::Address;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{lock, now_secs, random_id, Server};

const REALM: &str = "sim-mpp.example";
const NETWORK_ID: &str = "net_sim_shop";

#[derive(Default)]
struct Books {
    /// token → its limits (max cents, currency, expiry, network).
    tokens: HashMap<String, (u64, String, u64, String)>,
    /// PSP idempotency key → token.
    minted: HashMap<String, String>,
    /// (challenge id, token) → PaymentIntent id: what was charged, once.
    charges: HashMap<(String, String), (String, u64)>,
}

struct Shop {
    secret: String,
    price_cents: u64,
    books: Mutex<Books>,
}

/// The running provider.
pub struct MppShop {
    server: Server,
    shop: Arc<Shop>,
}

impl MppShop {
    /// A shop selling `/data` for `price_cents`.
    pub async fn start(price_cents: u64) -> std::io::Result<MppShop> {
        let shop = Arc::new(Shop {
            secret: hex::encode(rand::random::<[u8; 32]>()),
            price_cents,
            books: Mutex::new(Books::default()),
        });
        let app = Router::new().route("/data", get(data)).route(SPT_PATH, post(mint)).with_state(shop.clone());
        Ok(MppShop { server: Server::start(app).await?, shop })
    }

    /// The base URL of both the resource and the PSP.
    pub fn base(&self) -> &str {
        self.server.base()
    }

    /// What the shop charged, in micro-USD.
    pub fn charged_micros(&self) -> u64 {
        lock(&self.shop.books).charges.values().map(|(_, cents)| cents * 10_000).sum()
    }
}

fn challenge(shop: &Shop) -> Response {
    let request = json!({
        "amount": shop.price_cents.to_string(),
        "currency": "usd",
        "methodDetails": { "networkId": NETWORK_ID, "paymentMethodTypes": ["card"] },
    });
    let Ok(request) = Base64UrlJson::from_value(&request) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let expires = jiff::Timestamp::from_second((now_secs() + 300) as i64).map(|t| t.to_string()).unwrap_or_default();
    let challenge = PaymentChallenge::with_secret_key_full(
        &shop.secret,
        REALM,
        "stripe",
        "charge",
        request,
        Some(&expires),
        None,
        None,
        None,
        None,
    );
    match format_www_authenticate(&challenge) {
        Ok(header) => {
            (StatusCode::PAYMENT_REQUIRED, [("www-authenticate", header)], "payment required").into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn data(State(shop): State<Arc<Shop>>, headers: HeaderMap) -> Response {
    let Some(credential) =
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|text| parse_authorization(text).ok())
    else {
        return challenge(&shop);
    };
    let echo = &credential.challenge;
    let mut issued = PaymentChallenge::new(
        echo.id.clone(),
        echo.realm.clone(),
        echo.method.clone(),
        echo.intent.clone(),
        echo.request.clone(),
    );
    issued.expires = echo.expires.clone();
    issued.digest = echo.digest.clone();
    issued.opaque = echo.opaque.clone();
    let request: serde_json::Value = echo.request.decode_value().unwrap_or_default();
    let spt = credential.payload.get("spt").and_then(|s| s.as_str()).unwrap_or_default().to_owned();
    let valid = issued.verify(&shop.secret)
        && !issued.is_expired()
        && request["amount"] == json!(shop.price_cents.to_string())
        && request["currency"] == "usd";
    if !valid {
        return challenge(&shop);
    }
    let mut books = lock(&shop.books);
    let key = (echo.id.clone(), spt.clone());
    let reference = match books.charges.get(&key) {
        Some((reference, _)) => reference.clone(),
        None => {
            let within = books.tokens.get(&spt).is_some_and(|(max, currency, expires, network)| {
                shop.price_cents <= *max && currency == "usd" && now_secs() < *expires && network == NETWORK_ID
            });
            let spent = books.charges.keys().any(|(_, token)| *token == spt);
            if !within || spent {
                drop(books);
                return challenge(&shop);
            }
            let reference = random_id("pi");
            books.charges.insert(key, (reference.clone(), shop.price_cents));
            reference
        }
    };
    drop(books);
    match format_receipt(&Receipt::success("stripe", reference)) {
        Ok(receipt) => (StatusCode::OK, [("payment-receipt", receipt)], Json(json!({"data": "paid"}))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn mint(
    State(shop): State<Arc<Shop>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let (Ok(max), Ok(expires)) =
        (field("usage_limits[max_amount]").parse::<u64>(), field("usage_limits[expires_at]").parse::<u64>())
    else {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "usage_limits"}}))).into_response();
    };
    let mut books = lock(&shop.books);
    if let Some(token) = books.minted.get(&key).filter(|_| !key.is_empty()) {
        return Json(json!({ "id": token })).into_response();
    }
    let token = random_id("spt");
    books
        .tokens
        .insert(token.clone(), (max, field("usage_limits[currency]"), expires, field("seller_details[network_id]")));
    if !key.is_empty() {
        books.minted.insert(key, token.clone());
    }
    Json(json!({ "id": token })).into_response()
}

/// The payee of the simulated session server.
pub const SESSION_PAYEE: &str = "0x00000000000000000000000000000000005e55a1";
/// The escrow contract the simulated session server names.
pub const SESSION_ESCROW: &str = "0x00000000000000000000000000000000e5c40e00";

/// One channel as the session server knows it.
struct SimChannel {
    signer: Address,
    deposit: u128,
    /// The highest voucher accepted (what the payee can redeem).
    accepted: u128,
    closed: bool,
}

#[derive(Default)]
struct SessionBooks {
    channels: HashMap<String, SimChannel>,
    /// Every `Authorization` a paid request carried, in order.
    credentials: Vec<String>,
}

struct SessionShop {
    secret: String,
    price: u64,
    suggested_deposit: u64,
    /// The next accepted voucher's answer never comes (the connection hangs).
    hang_next: std::sync::atomic::AtomicBool,
    books: Mutex<SessionBooks>,
}

/// A simulated MPP `session` server over the `tempo` method: each request to `/stream` costs
/// `price` micro-USD (pathUSD base units), paid by a cumulative voucher of a channel the client
/// opened with a deposit. It verifies the HMAC-bound challenge, the open's deposit signature,
/// every voucher's EIP-712 signature (recovered to the channel's signer), that a voucher stays
/// within the deposit and pays at least the price more than the last one (the same voucher again
/// is answered again, charging nothing more), and answers with a session `Payment-Receipt`
/// (`acceptedCumulative`).
pub struct MppSessionShop {
    server: Server,
    shop: Arc<SessionShop>,
}

impl MppSessionShop {
    pub async fn start(price: u64, suggested_deposit: u64) -> std::io::Result<MppSessionShop> {
        let shop = Arc::new(SessionShop {
            secret: hex::encode(rand::random::<[u8; 32]>()),
            price,
            suggested_deposit,
            hang_next: Default::default(),
            books: Mutex::new(SessionBooks::default()),
        });
        let app = Router::new().route("/stream", get(stream)).with_state(shop.clone());
        Ok(MppSessionShop { server: Server::start(app).await?, shop })
    }

    pub fn base(&self) -> &str {
        self.server.base()
    }

    /// What the payee can redeem: the highest accepted voucher of every channel, in micro-USD.
    pub fn charged_micros(&self) -> u64 {
        let books = lock(&self.shop.books);
        books.channels.values().map(|c| u64::try_from(c.accepted).unwrap_or(u64::MAX)).sum()
    }

    /// How many channels were opened.
    pub fn channels(&self) -> usize {
        lock(&self.shop.books).channels.len()
    }

    /// Every credential received, in order.
    pub fn credentials(&self) -> Vec<String> {
        lock(&self.shop.books).credentials.clone()
    }

    /// The next accepted voucher is charged, then its answer never comes.
    pub fn hang_next(&self) {
        self.shop.hang_next.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn session_challenge(shop: &SessionShop) -> Response {
    let request = json!({
        "amount": shop.price.to_string(),
        "unitType": "request",
        "currency": PATH_USD,
        "recipient": SESSION_PAYEE,
        "suggestedDeposit": shop.suggested_deposit.to_string(),
        "methodDetails": { "escrowContract": SESSION_ESCROW, "chainId": TEMPO_CHAIN_ID },
    });
    let Ok(request) = Base64UrlJson::from_value(&request) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let expires = jiff::Timestamp::from_second((now_secs() + 300) as i64).map(|t| t.to_string()).unwrap_or_default();
    let challenge = PaymentChallenge::with_secret_key_full(
        &shop.secret,
        "sim-session.example",
        "tempo",
        "session",
        request,
        Some(&expires),
        None,
        None,
        None,
        None,
    );
    match format_www_authenticate(&challenge) {
        Ok(header) => {
            (StatusCode::PAYMENT_REQUIRED, [("www-authenticate", header)], "payment required").into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The voucher's channel, signer check and new accepted amount, or why it is refused.
fn accept(books: &mut SessionBooks, shop: &SessionShop, payload: &SessionPayload) -> Result<(String, u128), String> {
    let (escrow, chain): (Address, u64) = (SESSION_ESCROW.parse().map_err(|_| "escrow")?, TEMPO_CHAIN_ID);
    let (channel_id, cumulative, signature) = match payload {
        SessionPayload::Open { channel_id, cumulative_amount, signature, .. }
        | SessionPayload::Voucher { channel_id, cumulative_amount, signature }
        | SessionPayload::Close { channel_id, cumulative_amount, signature } => {
            (channel_id, cumulative_amount, signature)
        }
    };
    let id: adapters::mpp::session::B256 = channel_id.parse().map_err(|_| "channelId")?;
    let cumulative: u128 = cumulative.parse().map_err(|_| "cumulativeAmount")?;
    if let SessionPayload::Open { transaction, authorized_signer, .. } = payload {
        let (deposit, deposit_signature) = parse_open_transaction(transaction).ok_or("transaction")?;
        let signer: Address = authorized_signer.parse().map_err(|_| "authorizedSigner")?;
        if recover(&open_digest(id, deposit, escrow, chain), &deposit_signature) != Some(signer) {
            return Err("the deposit is not signed by the channel's signer".into());
        }
        books.channels.entry(channel_id.clone()).or_insert(SimChannel { signer, deposit, accepted: 0, closed: false });
    }
    let channel = books.channels.get_mut(channel_id).ok_or("unknown channel")?;
    if recover(&voucher_digest(id, cumulative, escrow, chain), signature) != Some(channel.signer) {
        return Err("the voucher is not signed by the channel's signer".into());
    }
    if cumulative > channel.deposit || channel.closed {
        return Err("the voucher is above the deposit, or the channel is closed".into());
    }
    if cumulative != channel.accepted && cumulative < channel.accepted + u128::from(shop.price) {
        return Err("the voucher does not pay the price".into());
    }
    channel.accepted = channel.accepted.max(cumulative);
    if matches!(payload, SessionPayload::Close { .. }) {
        channel.closed = true;
    }
    Ok((channel_id.clone(), channel.accepted))
}

async fn stream(State(shop): State<Arc<SessionShop>>, headers: HeaderMap) -> Response {
    let Some(text) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return session_challenge(&shop);
    };
    let Ok(credential) = parse_authorization(text) else { return session_challenge(&shop) };
    let echo = &credential.challenge;
    let mut issued = PaymentChallenge::new(
        echo.id.clone(),
        echo.realm.clone(),
        echo.method.clone(),
        echo.intent.clone(),
        echo.request.clone(),
    );
    issued.expires = echo.expires.clone();
    issued.digest = echo.digest.clone();
    issued.opaque = echo.opaque.clone();
    let Ok(payload) = serde_json::from_value::<SessionPayload>(credential.payload.clone()) else {
        return session_challenge(&shop);
    };
    if !issued.verify(&shop.secret) || issued.is_expired() {
        return session_challenge(&shop);
    }
    let accepted = {
        let mut books = lock(&shop.books);
        books.credentials.push(text.to_owned());
        accept(&mut books, &shop, &payload)
    };
    let Ok((channel_id, accepted)) = accepted else { return session_challenge(&shop) };
    if shop.hang_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    }
    let mut receipt = Receipt::success("tempo", channel_id.clone());
    receipt.extensions.insert("intent".to_owned(), json!("session"));
    receipt.extensions.insert("challengeId".to_owned(), json!(echo.id));
    receipt.extensions.insert("channelId".to_owned(), json!(channel_id));
    receipt.extensions.insert("acceptedCumulative".to_owned(), json!(accepted.to_string()));
    receipt.extensions.insert("spent".to_owned(), json!(accepted.to_string()));
    match format_receipt(&receipt) {
        Ok(receipt) => {
            (StatusCode::OK, [("payment-receipt", receipt)], Json(json!({"data": "a paid chunk"}))).into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_challenge_verifies_and_a_forged_one_does_not() {
        let shop = MppShop::start(1).await.expect("starts");
        let answer = reqwest::get(format!("{}/data", shop.base())).await.expect("request");
        assert_eq!(answer.status(), 402);
        let header = answer.headers()["www-authenticate"].to_str().expect("ascii").to_owned();
        let challenge = adapters::mpp::parse_www_authenticate(&header).expect("parses");
        assert!(challenge.verify(&shop.shop.secret), "HMAC-bound, expires included");
        let mut forged = challenge.clone();
        forged.request = Base64UrlJson::from_value(&json!({"amount": "0", "currency": "usd"})).expect("encodes");
        assert!(!forged.verify(&shop.shop.secret));
        assert_eq!(shop.charged_micros(), 0);
    }
}

#[cfg(test)]
mod session_tests {
    use adapters::conformance::ConformanceSink;
    use adapters::mpp::session::{choose_session, session_credential, Action, Channel, SessionPolicy};
    use adapters::x402::EvmSigner;
    use adapters::Micros;

    use super::*;

    const PAYER: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
    const OTHER: &str = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    /// Sends `action` at `cumulative` on `channel`, signed by `signer`, against a fresh challenge.
    async fn send(
        shop: &MppSessionShop,
        channel: &Channel,
        signer: &EvmSigner,
        action: Action,
        cumulative: u128,
    ) -> u16 {
        let url = format!("{}/stream", shop.base());
        let answer = reqwest::get(&url).await.expect("request");
        let header = answer.headers()["www-authenticate"].to_str().expect("ascii").to_owned();
        let challenge = adapters::mpp::parse_www_authenticate(&header).expect("parses");
        let payload = channel.payload(action, cumulative, signer).expect("signs");
        let credential = session_credential(&challenge, &payload, &ConformanceSink::disabled()).expect("credential");
        let client = reqwest::Client::new();
        client.get(&url).header("authorization", credential).send().await.expect("request").status().as_u16()
    }

    #[tokio::test]
    async fn the_session_server_takes_only_signed_vouchers_within_the_deposit_that_pay_the_price() {
        let shop = MppSessionShop::start(30, 100).await.expect("starts");
        let answer = reqwest::get(format!("{}/stream", shop.base())).await.expect("request");
        let header = answer.headers()["www-authenticate"].to_str().expect("ascii").to_owned();
        let challenge = adapters::mpp::parse_www_authenticate(&header).expect("parses");
        let policy = SessionPolicy {
            tokens: vec![PATH_USD.parse().expect("token")],
            chain_ids: vec![TEMPO_CHAIN_ID],
            max_payment: Micros::new(1_000).expect("m"),
            max_deposit: Micros::new(1_000).expect("m"),
            default_units: 10,
        };
        let choice = choose_session(&[challenge], &policy).expect("a session challenge");
        assert_eq!((choice.price.get(), choice.deposit.get()), (30, 100));
        let (payer, other) = (EvmSigner::from_hex(PAYER).expect("key"), EvmSigner::from_hex(OTHER).expect("key"));
        let channel = Channel::open(&choice, &payer, [1; 32]);
        // A voucher before the open, or the open signed by another key than it names: refused.
        assert_eq!(send(&shop, &channel, &payer, Action::Voucher, 30).await, 402);
        let forged = Channel { payer: other.address(), ..channel.clone() };
        assert_eq!(send(&shop, &forged, &payer, Action::Open, 30).await, 402);
        assert_eq!(send(&shop, &channel, &payer, Action::Open, 30).await, 200);
        // Below the price, above the deposit, or signed by another key: refused; nothing charged.
        assert_eq!(send(&shop, &channel, &payer, Action::Voucher, 59).await, 402);
        assert_eq!(send(&shop, &channel, &payer, Action::Voucher, 120).await, 402);
        assert_eq!(send(&shop, &channel, &other, Action::Voucher, 60).await, 402);
        assert_eq!(shop.charged_micros(), 30);
        // The same voucher again is answered again and charges nothing more; the next pays.
        assert_eq!(send(&shop, &channel, &payer, Action::Open, 30).await, 200);
        assert_eq!(send(&shop, &channel, &payer, Action::Voucher, 60).await, 200);
        assert_eq!(shop.charged_micros(), 60);
    }
}
