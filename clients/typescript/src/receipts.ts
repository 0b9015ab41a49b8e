/**
 * Offline verification of spendcap receipts: each is an Ed25519 signature over the RFC 8785
 * canonical JSON of its `receipt` body, and the receipts of one budget tree form a hash chain
 * (`seq`, and `prev_hash` = SHA-256 hex of the previous receipt's canonical body).
 */

import { createHash, createPublicKey, verify } from "node:crypto";

import type { Receipt } from "./types.js";

/** The `prev_hash` of a tree's first receipt. */
export const GENESIS_HASH = "0".repeat(64);

/** Why a receipt or a chain did not verify. */
export class ReceiptInvalid extends Error {
  override name = "ReceiptInvalid";
}

/**
 * Verifies every receipt's signature with `publicKey` (Ed25519, base64url as `GET
 * /v1/receipt-key` gives it) and, per tree, that sequence numbers follow each other and each
 * `prev_hash` names the receipt before. Throws `ReceiptInvalid` at the first receipt that fails.
 */
export function verifyReceipts(receipts: Receipt[], publicKey: string): { receipts: number; trees: number } {
  const key = createPublicKey({
    key: { kty: "OKP", crv: "Ed25519", x: publicKey.trim().replace(/=+$/, "") },
    format: "jwk",
  });
  const keyId = createHash("sha256")
    .update(Buffer.from(publicKey.trim(), "base64url"))
    .digest("hex")
    .slice(0, 16);
  const last = new Map<string, { seq: number; hash: string }>();
  for (const receipt of receipts) {
    const body = receipt.receipt;
    const where = `receipt ${body.seq} of tree ${body.tree}`;
    if (receipt.key_id !== keyId) {
      throw new ReceiptInvalid(`${where} names key ${receipt.key_id}, not ${keyId}`);
    }
    const canonical = Buffer.from(canonicalJson(body));
    if (!verify(null, canonical, key, Buffer.from(receipt.signature, "base64url"))) {
      throw new ReceiptInvalid(`${where}: the signature does not verify`);
    }
    const previous = last.get(body.tree);
    if (previous !== undefined && body.seq !== previous.seq + 1) {
      throw new ReceiptInvalid(`${where} follows seq ${previous.seq}; a receipt is missing or out of order`);
    }
    if (previous !== undefined && body.prev_hash !== previous.hash) {
      throw new ReceiptInvalid(`${where}: prev_hash does not name the previous receipt`);
    }
    if (previous === undefined && body.seq === 1 && body.prev_hash !== GENESIS_HASH) {
      throw new ReceiptInvalid(`${where}: the first receipt must name the genesis hash`);
    }
    last.set(body.tree, { seq: body.seq, hash: createHash("sha256").update(canonical).digest("hex") });
  }
  return { receipts: receipts.length, trees: last.size };
}

/**
 * RFC 8785 (JSON Canonicalization Scheme): object keys sorted by UTF-16 code units, no
 * whitespace, strings and numbers as ECMAScript's JSON.stringify writes them (which is what the
 * RFC specifies); `bigint` values are integers.
 */
export function canonicalJson(value: unknown): string {
  if (typeof value === "bigint") {
    return value.toString();
  }
  if (Array.isArray(value)) {
    return `[${value.map(canonicalJson).join(",")}]`;
  }
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, item]) => item !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([name, item]) => `${JSON.stringify(name)}:${canonicalJson(item)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}
