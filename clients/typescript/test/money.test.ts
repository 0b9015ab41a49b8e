/**
 * Dollars are exact text and micros are bigint, on the way in and out: no amount goes through a
 * JavaScript number on its way to the wire.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { formatUsd, toMicros, usd } from "@spendcap/client";

import { decodeJson, encodeJson } from "../src/http.js";

test("dollar text parses exactly into micros, and what is not an amount is refused", () => {
  assert.equal(usd("1.50"), 1_500_000n);
  assert.equal(usd("0.10"), 100_000n);
  assert.equal(usd("0.000001"), 1n);
  assert.equal(usd("12"), 12_000_000n);
  assert.equal(usd("999999999.999999"), 999_999_999_999_999n);
  for (const bad of ["", "1.", ".5", "-1", "1e3", "0.1234567", "1,50", "$1", "0x10", "Infinity"]) {
    assert.throws(() => usd(bad), RangeError, bad);
  }
  assert.equal(toMicros(7n), 7n);
  assert.throws(() => toMicros(0.1 as unknown as string), TypeError);
});

test("micros format as dollars without rounding", () => {
  assert.deepEqual([1_500_000n, 1n, 0n, 20_000n, 123_456_789n, -250_000n].map(formatUsd), [
    "1.50",
    "0.000001",
    "0.00",
    "0.02",
    "123.456789",
    "-0.25",
  ]);
});

test("bigint amounts travel as exact JSON integers, beyond what a number can hold", () => {
  const text = encodeJson({ cap_micros: 9_007_199_254_740_993n, note: "\u0000spendcap-bigint:1" });
  assert.equal(text, '{"cap_micros":9007199254740993,"note":"\\u0000spendcap-bigint:1"}');
  assert.deepEqual(decodeJson('{"spent_micros":450000,"status":200,"nested":[{"amount_micros":1}]}'), {
    spent_micros: 450_000n,
    status: 200,
    nested: [{ amount_micros: 1n }],
  });
});
