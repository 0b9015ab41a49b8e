/**
 * A scripted language model for the AI SDK's own tool-calling loop (`MockLanguageModelV3` from
 * `ai/test`): step n answers the n-th entry of the script — tool calls, or a final text. What the
 * model was sent (the tool results it read) is in `model.doGenerateCalls`.
 */

import { MockLanguageModelV3 } from "ai/test";

type GenerateResult = Awaited<ReturnType<MockLanguageModelV3["doGenerate"]>>;

/** One scripted tool call: the tool's name, its input, and the call id the SDK passes to it. */
export interface ScriptedCall {
  id: string;
  tool: string;
  input: Record<string, unknown>;
}

export type Step = ScriptedCall[] | string;

const USAGE = {
  inputTokens: { total: 10, noCache: 10, cacheRead: 0, cacheWrite: 0 },
  outputTokens: { total: 5, text: 5, reasoning: 0 },
};

export function scriptedModel(script: Step[]): MockLanguageModelV3 {
  let step = 0;
  return new MockLanguageModelV3({
    doGenerate: async (): Promise<GenerateResult> => {
      const next = script[step] ?? "(the script has ended)";
      step += 1;
      if (typeof next === "string") {
        return {
          content: [{ type: "text", text: next }],
          finishReason: { unified: "stop", raw: "stop" },
          usage: USAGE,
          warnings: [],
        };
      }
      return {
        content: next.map((call) => ({
          type: "tool-call" as const,
          toolCallId: call.id,
          toolName: call.tool,
          input: JSON.stringify(call.input),
        })),
        finishReason: { unified: "tool-calls", raw: "tool_calls" },
        usage: USAGE,
        warnings: [],
      };
    },
  });
}

/** The tool results (by call id) the model was sent in its `n`-th call. */
export function toolResultsSeen(model: MockLanguageModelV3, n: number): Map<string, unknown> {
  const results = new Map<string, unknown>();
  for (const message of model.doGenerateCalls[n]?.prompt ?? []) {
    if (message.role !== "tool") continue;
    for (const part of message.content) {
      if (part.type === "tool-result" && part.output.type === "json") {
        results.set(part.toolCallId, part.output.value);
      }
    }
  }
  return results;
}
