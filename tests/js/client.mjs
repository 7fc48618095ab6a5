// One official Yjs client (Y.Doc + y-websocket WebsocketProvider), driven by tests/yjs_client.py.
//
// Usage: node client.mjs --url ws://HOST:PORT/v1/orgs/ORG/docs --doc DOC [--token TOKEN] [--no-connect]
//
// stdin: one JSON command per line, {"id": ..., "op": "...", ...}.
// stdout: one JSON line per reply ({"id", "result"} or {"id", "error"}) or event ({"event", ...}).
// stdout carries nothing else: console.log is redirected to stderr so library chatter cannot
// corrupt the protocol. This file is copied next to node_modules by ensure_js(), because ESM
// imports resolve relative to the file and ignore NODE_PATH.

import { parseArgs } from 'node:util'
import * as readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

console.log = console.error

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    doc: { type: 'string' },
    token: { type: 'string' },
    'no-connect': { type: 'boolean', default: false }
  }
})
if (!args.url || !args.doc) {
  console.error('usage: client.mjs --url ws://HOST:PORT/v1/orgs/ORG/docs --doc DOC [--token T] [--no-connect]')
  process.exit(2)
}

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const doc = new Y.Doc()
// disableBc: BroadcastChannel only syncs tabs of one browser; here it would just keep the process alive.
const provider = new WebsocketProvider(args.url, args.doc, doc, {
  connect: !args['no-connect'],
  params: args.token === undefined ? {} : { token: args.token },
  WebSocketPolyfill: WebSocket,
  disableBc: true
})

provider.on('status', ({ status }) => emit({ event: 'status', status }))
provider.on('sync', (synced) => { if (synced) emit({ event: 'synced' }) })
// `event` is the socket's CloseEvent, or null when the provider closed the socket itself
// (disconnect(), destroy(), or its 30 s "no message received" watchdog).
provider.on('connection-close', (event) => emit(event === null
  ? { event: 'close', code: null, reason: null, local: true }
  : { event: 'close', code: event.code, reason: event.reason, local: false }))
// Emitted when shouldReconnect() refused (by default: close codes 4400-4499); no reconnect follows.
provider.on('closed', ({ code, reason }) => emit({ event: 'closed', code, reason }))
provider.on('connection-error', (event) => emit({ event: 'error', source: 'connection', message: String(event?.message ?? event) }))
process.on('uncaughtException', (err) => emit({ event: 'error', source: 'uncaught', message: String(err?.stack ?? err) }))
process.on('unhandledRejection', (err) => emit({ event: 'error', source: 'unhandled', message: String(err?.stack ?? err) }))

const b64 = (bytes) => Buffer.from(bytes).toString('base64')
const names = (list) => (Array.isArray(list) ? list : [])

/** Resolve when check() is true, re-evaluated whenever `on`'s callback fires; reject after timeoutMs. */
const waitUntil = (check, on, off, timeoutMs, what) => new Promise((resolve, reject) => {
  if (check()) return resolve()
  const listener = () => { if (check()) { done(); resolve() } }
  const timer = setTimeout(() => { done(); reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)) }, timeoutMs)
  const done = () => { clearTimeout(timer); off(listener) }
  on(listener)
})

let closing = false

const commands = {
  map_set: ({ map, key, value }) => { doc.getMap(map).set(key, value) },
  map_set_map: ({ map, key, fields }) => { doc.getMap(map).set(key, new Y.Map(Object.entries(fields ?? {}))) },
  map_delete: ({ map, key }) => { doc.getMap(map).delete(key) },
  array_push: ({ array, values }) => { doc.getArray(array).push(values) },
  text_insert: ({ text, index, value }) => { doc.getText(text).insert(index, value) },
  burst: ({ n, map }) => {
    // One transaction per set: every one becomes its own update message on the socket.
    const ymap = doc.getMap(map)
    const started = performance.now()
    for (let i = 0; i < n; i++) ymap.set(`b${i}`, i)
    return { n, elapsed_ms: performance.now() - started }
  },
  awareness: ({ state }) => { provider.awareness.setLocalState(state) },
  peers: () => {
    const peers = {}
    provider.awareness.getStates().forEach((state, clientId) => {
      if (clientId !== doc.clientID) peers[clientId] = state
    })
    return peers
  },
  state: ({ maps, arrays, texts }) => ({
    client_id: doc.clientID,
    maps: Object.fromEntries(names(maps).map((n) => [n, doc.getMap(n).toJSON()])),
    arrays: Object.fromEntries(names(arrays).map((n) => [n, doc.getArray(n).toJSON()])),
    texts: Object.fromEntries(names(texts).map((n) => [n, doc.getText(n).toString()])),
    synced: provider.synced,
    update: b64(Y.encodeStateAsUpdate(doc)),
    state_vector: b64(Y.encodeStateVector(doc))
  }),
  wait_synced: ({ timeout_ms: timeoutMs = 10000 }) => waitUntil(
    () => provider.synced,
    (l) => provider.on('sync', l), (l) => provider.off('sync', l),
    timeoutMs, 'sync'),
  wait_for: ({ map, key, timeout_ms: timeoutMs = 10000 }) => {
    const ymap = doc.getMap(map)
    return waitUntil(
      () => ymap.has(key),
      (l) => ymap.observe(l), (l) => ymap.unobserve(l),
      timeoutMs, `key ${JSON.stringify(key)} in map ${JSON.stringify(map)}`)
  },
  connect: () => { provider.connect() },
  disconnect: () => { provider.disconnect() },
  close: async () => {
    closing = true
    // destroy() sends a final "I left" awareness update, then closes the socket; wait (briefly) for
    // the close so that message is flushed before the process exits.
    const ws = provider.ws
    const closed = ws === null || ws.readyState === WebSocket.CLOSED
      ? Promise.resolve()
      : new Promise((resolve) => { ws.once('close', resolve); setTimeout(resolve, 1000) })
    provider.destroy()
    doc.destroy()
    await closed
  }
}

const handle = async (line) => {
  let id = null
  try {
    const cmd = JSON.parse(line)
    id = cmd.id ?? null
    const fn = Object.hasOwn(commands, cmd.op) ? commands[cmd.op] : undefined
    if (fn === undefined) throw new Error(`unknown op ${JSON.stringify(cmd.op)}`)
    if (closing) throw new Error('client is closing')
    const result = await fn(cmd)
    emit({ id, result: result ?? null })
    if (cmd.op === 'close') process.exit(0)
  } catch (err) {
    emit({ id, error: String(err?.message ?? err) })
  }
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => { if (line.trim() !== '') handle(line) })
// The parent went away without saying "close": do not linger as an orphan.
rl.on('close', () => { if (!closing) process.exit(0) })

emit({ event: 'ready', client_id: doc.clientID, url: provider.url })
