#!/usr/bin/env node
// Start a job on sdproxy, receive its signed webhook, verify the signature, and save the image.
//
//   SDPROXY_WEBHOOK_SECRET=... node examples/node-jobs/jobs.mjs \
//     --proxy http://127.0.0.1:8000 [--api-key KEY] [--seed 42] [--out fox.jpg] "a watercolor fox"
//
// Node 18 or later, standard library only (fetch, node:http, node:crypto). The script listens for
// the webhook on 127.0.0.1 (a loopback target: the proxy must run with
// SDPROXY_WEBHOOK_ALLOW_PRIVATE=true); behind a public URL, pass it with --webhook-url and the
// local port with --listen-port. Meanwhile it polls GET /v1/jobs/{id}, as a page would.
// It prints one JSON line: {"job", "status", "seed", "verified", "bytes", "out"}.

import { createHmac, timingSafeEqual } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const TOLERANCE_S = 300; // refuse signatures older than this: a captured delivery cannot be replayed

/**
 * Check an `Sdproxy-Signature: t=<unix seconds>,v1=<hex>` header: the HMAC-SHA256 of
 * `"<t>." + rawBody`, keyed by the deployment's webhook secret, compared in constant time.
 * @param {string} secret
 * @param {Buffer} rawBody the bytes as received (never a re-serialized JSON object)
 * @param {string | undefined} header
 * @returns {boolean}
 */
export function verifySignature(secret, rawBody, header, now = Date.now() / 1000) {
  if (!header) return false;
  const parts = Object.fromEntries(header.split(",").map((item) => item.split("=", 2)));
  const timestamp = Number.parseInt(parts.t ?? "", 10);
  if (!Number.isFinite(timestamp) || Math.abs(now - timestamp) > TOLERANCE_S) return false;
  const expected = createHmac("sha256", secret)
    .update(`${timestamp}.`)
    .update(rawBody)
    .digest();
  const given = Buffer.from(parts.v1 ?? "", "hex");
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** Listen for one valid webhook; resolves with its parsed body. */
function receiveWebhook(secret, port) {
  let resolve;
  const delivered = new Promise((r) => (resolve = r));
  const server = createServer((request, response) => {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      const body = Buffer.concat(chunks);
      if (!verifySignature(secret, body, request.headers["sdproxy-signature"])) {
        response.writeHead(401).end(); // not from the proxy, or altered: ignored
        return;
      }
      response.writeHead(204).end();
      resolve(JSON.parse(body.toString("utf8")));
    });
  });
  return new Promise((ready) =>
    server.listen(port, "127.0.0.1", () => ready({ server, port: server.address().port, delivered })),
  );
}

async function call(url, options, apiKey) {
  const headers = { ...(options.headers ?? {}) };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(url, { ...options, headers });
  if (!response.ok) {
    const detail = await response.json().catch(() => ({}));
    throw new Error(`${options.method ?? "GET"} ${url}: HTTP ${response.status} ${detail.error?.code ?? ""} ${detail.error?.message ?? ""}`);
  }
  return response;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      proxy: { type: "string", default: process.env.SDPROXY_URL ?? "http://127.0.0.1:8000" },
      "api-key": { type: "string", default: process.env.SDPROXY_API_KEY },
      secret: { type: "string", default: process.env.SDPROXY_WEBHOOK_SECRET },
      seed: { type: "string" },
      out: { type: "string", default: "job.jpg" },
      "webhook-url": { type: "string" },
      "listen-port": { type: "string", default: "0" },
      timeout: { type: "string", default: "120" },
    },
  });
  const prompt = positionals.join(" ");
  if (!prompt || !values.secret) {
    console.error('usage: SDPROXY_WEBHOOK_SECRET=... node jobs.mjs --proxy URL [--api-key KEY] "a prompt"');
    return 2;
  }
  const proxy = values.proxy.replace(/\/$/, "");
  const apiKey = values["api-key"];
  const hook = await receiveWebhook(values.secret, Number(values["listen-port"]));
  try {
    const webhookUrl = values["webhook-url"] ?? `http://127.0.0.1:${hook.port}/sdproxy-webhook`;
    const body = { prompt, webhook_url: webhookUrl };
    if (values.seed !== undefined) body.seed = Number(values.seed);
    const created = await call(
      `${proxy}/v1/jobs`,
      {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
        body: JSON.stringify(body),
      },
      apiKey,
    );
    const job = await created.json();
    console.error(`job ${job.id}: ${job.status}`);

    // Poll while waiting for the webhook: both say when the job is done.
    const deadline = Date.now() + Number(values.timeout) * 1000;
    let view = job;
    while (!["succeeded", "failed", "canceled"].includes(view.status)) {
      if (Date.now() > deadline) throw new Error(`job ${job.id} not done in time (${view.status})`);
      await new Promise((r) => setTimeout(r, 250));
      view = await (await call(`${proxy}/v1/jobs/${job.id}`, {}, apiKey)).json();
      if (view.position != null) console.error(`  queued, position ${view.position}`);
      if (view.eta_s != null) console.error(`  model loading, about ${view.eta_s} s`);
    }
    const payload = await Promise.race([
      hook.delivered,
      new Promise((_, reject) => setTimeout(() => reject(new Error("no webhook arrived")), 30_000)),
    ]);
    if (payload.id !== job.id) throw new Error(`a webhook for another job: ${payload.id}`);
    if (payload.status !== "succeeded") throw new Error(`job ${payload.status}: ${payload.error?.message}`);

    const image = Buffer.from(await (await call(payload.result_url, {}, apiKey)).arrayBuffer());
    await writeFile(values.out, image);
    console.log(
      JSON.stringify({
        job: job.id,
        status: payload.status,
        seed: payload.seed,
        verified: true,
        bytes: image.length,
        out: values.out,
      }),
    );
    return 0;
  } finally {
    hook.server.close();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  // Run as a program (not when imported for `verifySignature`).
  main().then(
    (code) => process.exit(code),
    (error) => {
      console.error(`error: ${error.message}`);
      process.exit(1);
    },
  );
}
