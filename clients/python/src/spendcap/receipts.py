"""Offline verification of spendcap receipts: Ed25519 over the RFC 8785 canonical JSON of the
receipt body, and the per-tree hash chain (`prev_hash` = SHA-256 of the previous body)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._models import Receipt

GENESIS_HASH = "0" * 64


class ReceiptInvalid(Exception):
    """A receipt's signature does not verify, or the chain is broken (`seq` says where)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class ChainReport:
    receipts: int
    trees: int


def _b64(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))


def _public_key(public_key: str) -> tuple[Ed25519PublicKey, str]:
    raw = _b64(public_key)
    if len(raw) != 32:
        raise ReceiptInvalid("the public key must be 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw), hashlib.sha256(raw).hexdigest()[:16]


def receipt_hash(receipt: Receipt) -> str:
    """The hash the next receipt of the chain names as `prev_hash`."""
    return hashlib.sha256(rfc8785.dumps(receipt.receipt)).hexdigest()


def verify(receipt: Receipt, public_key: str) -> None:
    """Checks one receipt's signature against the daemon's key (`/v1/receipt-key`)."""
    key, key_id = _public_key(public_key)
    if receipt.key_id != key_id:
        raise ReceiptInvalid(f"signed by key {receipt.key_id}, not {key_id}", receipt.seq)
    try:
        key.verify(_b64(receipt.signature), rfc8785.dumps(receipt.receipt))
    except (InvalidSignature, ValueError):
        raise ReceiptInvalid("the signature does not verify", receipt.seq) from None


def verify_chain(receipts: Sequence[Receipt], public_key: str) -> ChainReport:
    """Every signature, and within each tree consecutive `seq` whose `prev_hash` names the
    previous receipt: a deleted, reordered or edited receipt is detected."""
    last: dict[str, tuple[int, str]] = {}
    for receipt in receipts:
        verify(receipt, public_key)
        tree, seq, prev_hash = str(receipt.receipt["tree"]), receipt.seq, str(receipt.receipt["prev_hash"])
        if tree in last:
            last_seq, last_hash = last[tree]
            if seq != last_seq + 1:
                raise ReceiptInvalid(f"seq {seq} follows {last_seq}: a receipt is missing or out of order", seq)
            if prev_hash != last_hash:
                raise ReceiptInvalid("prev_hash does not name the previous receipt", seq)
        elif seq == 1 and prev_hash != GENESIS_HASH:
            raise ReceiptInvalid("the first receipt must name the genesis hash", seq)
        last[tree] = (seq, receipt_hash(receipt))
    return ChainReport(receipts=len(receipts), trees=len(last))
