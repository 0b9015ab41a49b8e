/**
 * Money is integer micro-USD (1 USD = 1,000,000) on the wire and `bigint` micros in this client.
 * Dollars are given as exact decimal text ("1.50"), never as JavaScript numbers: a float cannot
 * say 0.10 exactly, and a cap must not move by a rounding error.
 */

/** An amount: decimal USD text (`"1.50"`) or integer micro-USD as a `bigint` (`1_500_000n`). */
export type Amount = string | bigint;

const MICROS_PER_USD = 1_000_000n;
const USD_TEXT = /^(\d+)(?:\.(\d{1,6}))?$/;

/** Parses exact dollar text ("1.50", "0.000001", "12") into micro-USD; more than 6 decimals is refused. */
export function usd(text: string): bigint {
  const match = USD_TEXT.exec(text.trim());
  if (match === null) {
    throw new RangeError(
      `${JSON.stringify(text)} is not a USD amount (decimal text with at most 6 decimals)`,
    );
  }
  const whole = BigInt(match[1] ?? "0");
  const fraction = BigInt((match[2] ?? "").padEnd(6, "0"));
  return whole * MICROS_PER_USD + fraction;
}

/** Micro-USD of an [[Amount]]: dollar text is parsed exactly, a `bigint` is taken as micros. */
export function toMicros(amount: Amount): bigint {
  if (typeof amount === "bigint") {
    return amount;
  }
  if (typeof amount === "string") {
    return usd(amount);
  }
  throw new TypeError('amounts are USD decimal text ("1.50") or bigint micros (1_500_000n), never numbers');
}

/** Formats micro-USD as dollar text with at least two decimals: 1_500_000n → "1.50", 1n → "0.000001". */
export function formatUsd(micros: bigint): string {
  const sign = micros < 0n ? "-" : "";
  const absolute = micros < 0n ? -micros : micros;
  const whole = absolute / MICROS_PER_USD;
  const fraction = (absolute % MICROS_PER_USD)
    .toString()
    .padStart(6, "0")
    .replace(/0{1,4}$/, "");
  return `${sign}${whole}.${fraction.padEnd(2, "0")}`;
}
