'use strict';
// Drives the real `liveperson-functions-client` for one call and prints one JSON line.
//
// Command (argv[2] or stdin, JSON):
//   host                 address the client must reach on port 80 (required)
//   accountId            default "le-1234"
//   op                   "invoke" | "isImplemented" | "getLambdas" (default "invoke")
//   lambdaUuid | eventId target of invoke; eventId for isImplemented; optional filter for getLambdas
//   payload, headers     invoke body: {payload, headers: [{key, value}]} (headers given as an object)
//   body                 full invoke body, replaces payload/headers when present
//   version              "v1" (default) | "v2"; the client picks V2 when the CSDS domain contains
//                        "fninvocations" or "functions", so v2 uses a name that resolves to host
//   domain               override the CSDS answer (a host name or address, never a port)
//   failOnErrorStatusCode, timeout (ms), requestId, skillId, lpEventSource, externalSystem,
//   userId, state, v1CompError   passed to the client as-is
//   retries              false turns the client's own retries off (default: client behaviour)
//
// Result: {"outcome":"resolved","value":...} or
//         {"outcome":"thrown","name","message","status","body","causes","info"}
//         or, on a harness bug, {"outcome":"driver_error","message"} with exit code 2.
// Nothing here reaches the internet: CSDS is answered locally, authorization is a
// fixed header, no metric collector is installed, and host names are resolved locally.

const dns = require('dns');
const net = require('net');
const path = require('path');

const V2_DOMAIN = 'fninvocations.lp-harness.test';
const PASS_THROUGH = [
  'requestId', 'skillId', 'lpEventSource', 'externalSystem', 'userId', 'state',
  'v1CompError', 'failOnErrorStatusCode',
];

function readCommand() {
  if (process.argv[2] !== undefined) {
    return Promise.resolve(JSON.parse(process.argv[2]));
  }
  return new Promise((resolve, reject) => {
    let text = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', chunk => { text += chunk; });
    process.stdin.on('end', () => {
      try { resolve(JSON.parse(text)); } catch (error) { reject(error); }
    });
  });
}

function pickDomain(command) {
  if (command.domain !== undefined) return command.domain;
  return command.version === 'v2' ? V2_DOMAIN : command.host;
}

// The client cannot be told a port or an address for a name, so names resolve here; any
// other name fails, so nothing in the client can reach the internet by accident.
function pinNameResolution(domain, host) {
  const realLookup = dns.lookup;
  dns.lookup = (hostname, options, callback) => {
    const cb = typeof options === 'function' ? options : callback;
    const opts = typeof options === 'object' && options !== null ? options : {};
    if (hostname === domain && net.isIP(host)) {
      const family = net.isIP(host);
      process.nextTick(() => (opts.all
        ? cb(null, [{ address: host, family }])
        : cb(null, host, family)));
      return undefined;
    }
    if (hostname === domain || hostname === host || hostname === 'localhost') {
      return realLookup(hostname === domain ? host : hostname, options, callback);
    }
    const error = Object.assign(new Error(`harness blocks DNS for ${hostname}`), { code: 'ENOTFOUND' });
    process.nextTick(() => cb(error));
    return undefined;
  };
}

// Only used for "retries": false: the client hard-codes got's retry options.
function disableClientRetries() {
  const clientDir = path.dirname(require.resolve('liveperson-functions-client'));
  const gotModule = require(require.resolve('got', { paths: [clientDir] }));
  const realGot = gotModule.default;
  gotModule.default = (url, options) => realGot(url, {
    ...options, retry: { ...(options || {}).retry, limit: 0 },
  });
}

function buildClient(command, domain) {
  const { Client } = require('liveperson-functions-client');
  const config = {
    accountId: command.accountId || 'le-1234',
    authStrategy: async () => 'Bearer x',
    protocol: 'http',
    failOnErrorStatusCode: command.failOnErrorStatusCode === true,
  };
  if (command.timeout !== undefined) config.timeout = command.timeout;
  const tooling = { getCsdsEntry: async () => domain };
  return new Client(config, tooling);
}

function pickPassThrough(command) {
  const picked = {};
  for (const key of PASS_THROUGH) {
    if (command[key] !== undefined) picked[key] = command[key];
  }
  return picked;
}

function buildInvokeBody(command) {
  if (command.body !== undefined) return command.body;
  const headers = Object.entries(command.headers || {}).map(([key, value]) => ({ key, value }));
  return { headers, payload: command.payload === undefined ? {} : command.payload };
}

function callClient(client, command) {
  const common = pickPassThrough(command);
  const target = command.eventId !== undefined
    ? { eventId: command.eventId } : { lambdaUuid: command.lambdaUuid };
  switch (command.op || 'invoke') {
    case 'invoke':
      return client.invoke({ ...common, ...target, body: buildInvokeBody(command) });
    case 'isImplemented':
      return client.isImplemented({ ...common, eventId: command.eventId });
    case 'getLambdas':
      return client.getLambdas({ ...common, ...(command.eventId && { eventId: command.eventId }) });
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

function toJsonSafe(value, seen = new WeakSet()) {
  if (value === undefined) return null;
  if (value === null || typeof value !== 'object') {
    return typeof value === 'function' || typeof value === 'bigint' ? String(value) : value;
  }
  if (Buffer.isBuffer(value)) return { buffer_utf8: value.toString('utf8') };
  if (seen.has(value)) return '[circular]';
  seen.add(value);
  if (Array.isArray(value)) return value.map(item => toJsonSafe(item, seen));
  const out = {};
  for (const [key, item] of Object.entries(value)) out[key] = toJsonSafe(item, seen);
  return out;
}

function causeChain(error) {
  const chain = [];
  for (let e = error; e; e = e.jse_cause) chain.push(e);
  return chain;
}

// Same merge as VError.info(err): the outermost error's keys win.
function mergedInfo(chain) {
  const info = {};
  for (const e of [...chain].reverse()) Object.assign(info, e.jse_info || {});
  return info;
}

function describeThrown(error) {
  const chain = causeChain(error);
  const info = mergedInfo(chain);
  const response = info.response || {};
  return {
    outcome: 'thrown',
    name: error.name,
    message: error.message,
    status: toJsonSafe(response.status),
    body: toJsonSafe(response.body),
    causes: chain.map(e => ({ name: e.name, message: e.message })),
    info: toJsonSafe(info),
  };
}

async function main() {
  let command;
  let client;
  try {
    command = await readCommand();
    if (!command.host) throw new Error('command.host is required');
    const domain = pickDomain(command);
    pinNameResolution(domain, command.host);
    if (command.retries === false) disableClientRetries();
    client = buildClient(command, domain);
  } catch (error) {
    process.stdout.write(`${JSON.stringify({ outcome: 'driver_error', message: String(error && error.stack) })}\n`);
    process.exitCode = 2;
    return;
  }
  let result;
  try {
    result = { outcome: 'resolved', value: toJsonSafe(await callClient(client, command)) };
  } catch (error) {
    result = describeThrown(error);
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main();
