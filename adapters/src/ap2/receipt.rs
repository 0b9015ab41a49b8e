//! Verifying the receipts that end an AP2 payment: the Payment Receipt, signed by the Merchant
//! Payment Processor (or by the Credential Provider when it refuses), and the Checkout Receipt,
//! signed by the merchant. Both are ES256 JWTs whose payload follows its schema and whose
//! `reference` names the closed mandate they answer.

use super::error::Ap2Error;
use super::jose::verify_jws;
use super::pay::MandateReference;
use super::types::{CheckoutReceipt, Jwk, PaymentReceipt, ReceiptStatus};

/// `error` and `error_description` are present if and only if the status is `Error`.
fn check_error_fields(
    status: ReceiptStatus,
    error: &Option<String>,
    description: &Option<String>,
) -> Result<(), Ap2Error> {
    match (status, error, description) {
        (ReceiptStatus::Error, Some(_), Some(_)) | (ReceiptStatus::Success, None, None) => Ok(()),
        (ReceiptStatus::Error, _, _) => {
            Err(Ap2Error::ReceiptInvalid("an Error receipt needs error and error_description".into()))
        }
        (ReceiptStatus::Success, _, _) => Err(Ap2Error::ReceiptInvalid("a Success receipt carries no error".into())),
    }
}

impl PaymentReceipt {
    /// `Ok` for a `Success` receipt; the receipt's own error code and description otherwise.
    pub fn ensure_success(&self) -> Result<(), Ap2Error> {
        match self.status {
            ReceiptStatus::Success => Ok(()),
            ReceiptStatus::Error => Err(Ap2Error::ReceiptError {
                error: self.error.clone().unwrap_or_default(),
                description: self.error_description.clone().unwrap_or_default(),
            }),
        }
    }
}

impl CheckoutReceipt {
    /// `Ok` for a `Success` receipt; the receipt's own error code and description otherwise.
    pub fn ensure_success(&self) -> Result<(), Ap2Error> {
        match self.status {
            ReceiptStatus::Success => Ok(()),
            ReceiptStatus::Error => Err(Ap2Error::ReceiptError {
                error: self.error.clone().unwrap_or_default(),
                description: self.error_description.clone().unwrap_or_default(),
            }),
        }
    }
}

/// Verifies a Payment Receipt JWT: ES256 signature by one of `issuer_keys`, the schema
/// (`payment_id`; `psp_confirmation_id` and `network_confirmation_id` on success; `error` and
/// `error_description` exactly on error) and, when `expected` is given, that `reference` names
/// that closed Payment Mandate. A valid `Error` receipt is returned, not refused: its status is
/// the answer (see [`PaymentReceipt::ensure_success`]).
pub fn verify_payment_receipt(
    jwt: &str,
    issuer_keys: &[Jwk],
    expected: Option<&MandateReference>,
) -> Result<PaymentReceipt, Ap2Error> {
    let jws = verify_jws(jwt.trim(), issuer_keys)?;
    let receipt: PaymentReceipt = serde_json::from_str(&jws.payload_json)
        .map_err(|e| Ap2Error::ReceiptInvalid(format!("not a payment receipt: {e}")))?;
    check_error_fields(receipt.status, &receipt.error, &receipt.error_description)?;
    if receipt.status == ReceiptStatus::Success
        && (receipt.psp_confirmation_id.is_none() || receipt.network_confirmation_id.is_none())
    {
        return Err(Ap2Error::ReceiptInvalid("a Success payment receipt needs both confirmation ids".into()));
    }
    if expected.is_some_and(|reference| !reference.matches(&receipt.reference)) {
        return Err(Ap2Error::ReceiptReferenceMismatch);
    }
    Ok(receipt)
}

/// Verifies a Checkout Receipt JWT: ES256 signature by one of `issuer_keys` (the merchant's), the
/// schema (`order_id` on success; `error` and `error_description` exactly on error) and, when
/// `expected` is given, that `reference` names that closed Checkout Mandate.
pub fn verify_checkout_receipt(
    jwt: &str,
    issuer_keys: &[Jwk],
    expected: Option<&MandateReference>,
) -> Result<CheckoutReceipt, Ap2Error> {
    let jws = verify_jws(jwt.trim(), issuer_keys)?;
    let receipt: CheckoutReceipt = serde_json::from_str(&jws.payload_json)
        .map_err(|e| Ap2Error::ReceiptInvalid(format!("not a checkout receipt: {e}")))?;
    check_error_fields(receipt.status, &receipt.error, &receipt.error_description)?;
    if receipt.status == ReceiptStatus::Success && receipt.order_id.is_none() {
        return Err(Ap2Error::ReceiptInvalid("a Success checkout receipt needs order_id".into()));
    }
    if expected.is_some_and(|reference| !reference.matches(&receipt.reference)) {
        return Err(Ap2Error::ReceiptReferenceMismatch);
    }
    Ok(receipt)
}
