// Client load for bench/gateway.py: N official Yjs clients on M documents in this one process.
//
// Usage: node load.mjs --config FILE   (the JSON written by bench/gateway.py, see `defaults` below)
//
// Every client is a Y.Doc with the provider its server speaks: y-websocket's WebsocketProvider
// (canvasdb, the reference y-websocket server) or HocuspocusProvider (Hocuspocus), one socket per
// client. Clients are spread round robin over the documents. An edit sets a new key "client:n" of
// the map "bench" to performance.now(); a peer that receives it (an update it did not make) records
// now - value, so latency is measured on one clock from the sender's edit to the peer's observer.
//
// Modes:
//   rate:  each client edits `rate` times per second for `seconds` (open loop: a slow server shows
//          as latency, not as a slower sender).
//   flood: each client keeps `window` edits in flight (sent, not yet seen by all its peers) for
//          `seconds`: the delivered rate is the server's throughput.
//   seed:  the first client of each document writes `seed_keys` entries in one transaction; for
//          measuring a server's memory per open document.
// stdout: {"event": "connected", ...} once all clients are synced, then {"event": "result", ...};
// then the clients stay connected until a line (or EOF) on stdin, so the server's memory can be read.

import { parseArgs } from 'node:util'
import { readFileSync } from 'node:fs'
import * as readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { HocuspocusProvider } from '@hocuspocus/provider'

console.log = console.error
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const { values: args } = parseArgs({ options: { config: { type: 'string' } } })
if (!args.config) {
  console.error('usage: load.mjs --config FILE')
  process.exit(2)
}
const defaults = {
  server: 'canvasdb', // or 'y-websocket', 'hocuspocus'
  url: '', // canvasdb: ws://HOST:PORT/v1/orgs/ORG/docs; others: ws://HOST:PORT
  token: '',
  docs: [],
  clients: 10,
  mode: 'rate',
  rate: 10,
  seconds: 10,
  window: 16,
  seed_keys: 500,
  connect_timeout_s: 120,
  drain_timeout_s: 15
}
const cfg = { ...defaults, ...JSON.parse(readFileSync(args.config, 'utf8')) }

function makeProvider (doc, ydoc) {
  if (cfg.server === 'hocuspocus') {
    return new HocuspocusProvider({ url: cfg.url, name: doc, document: ydoc, WebSocketPolyfill: WebSocket, quiet: true })
  }
  return new WebsocketProvider(cfg.url, doc, ydoc, {
    params: cfg.token ? { token: cfg.token } : {}, WebSocketPolyfill: WebSocket, disableBc: true
  })
}

const latencies = []
let received = 0
let closes = 0
const pending = new Map() // key -> peers still to receive it (flood mode's window)
const clients = []
const groups = new Map() // doc -> clients

for (let i = 0; i < cfg.clients; i++) {
  const doc = cfg.docs[i % cfg.docs.length]
  const ydoc = new Y.Doc()
  const client = { i, doc, ydoc, map: ydoc.getMap('bench'), sent: 0, inFlight: 0, synced: false, next: 0, peers: 0 }
  if (!groups.has(doc)) groups.set(doc, [])
  groups.get(doc).push(client)
  client.map.observe((event, tr) => {
    if (tr.local) return
    const now = performance.now()
    for (const key of event.keysChanged) {
      const sender = Number(key.slice(0, key.indexOf(':')))
      const value = client.map.get(key)
      if (sender === i || typeof value !== 'number') continue
      latencies.push(now - value)
      received++
      const left = pending.get(key)
      if (left !== undefined) {
        if (left <= 1) {
          pending.delete(key)
          clients[sender].inFlight--
          scheduleRefill()
        } else pending.set(key, left - 1)
      }
    }
  })
  clients.push(client)
}
for (const group of groups.values()) for (const c of group) c.peers = group.length - 1

const connectStarted = performance.now()
await new Promise((resolve, reject) => {
  let synced = 0
  const timer = setTimeout(() => reject(new Error(`only ${synced} of ${clients.length} clients synced in ${cfg.connect_timeout_s} s`)),
    cfg.connect_timeout_s * 1000)
  for (const c of clients) {
    c.provider = makeProvider(c.doc, c.ydoc)
    const onSynced = () => {
      if (c.synced) return
      c.synced = true
      if (++synced === clients.length) { clearTimeout(timer); resolve() }
    }
    if (cfg.server === 'hocuspocus') {
      c.provider.on('synced', ({ state }) => { if (state) onSynced() })
      c.provider.on('close', () => { closes++ })
    } else {
      c.provider.on('sync', (s) => { if (s) onSynced() })
      c.provider.on('connection-close', () => { closes++ })
    }
  }
}).catch((err) => { emit({ event: 'error', message: String(err.message) }); process.exit(1) })
emit({ event: 'connected', clients: clients.length, docs: groups.size, seconds: (performance.now() - connectStarted) / 1000 })

const send = (c) => {
  const key = `${c.i}:${c.sent++}`
  if (cfg.mode === 'flood' && c.peers > 0) {
    pending.set(key, c.peers)
    c.inFlight++
  }
  c.map.set(key, performance.now())
}

// Flood mode refills the windows when edits complete (once per turn of the event loop), so
// the load generator spends CPU only on edits: a loop that polled the windows kept a core
// busy, taken from the server and its database on this shared machine.
let flooding = false
let refillDue = false
const refill = () => {
  refillDue = false
  if (flooding) for (const c of clients) while (c.inFlight < cfg.window) send(c)
}
function scheduleRefill () {
  if (flooding && !refillDue) { refillDue = true; setImmediate(refill) }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const expected = () => clients.reduce((n, c) => n + c.sent * c.peers, 0)

let sendSeconds = 0
if (cfg.mode === 'seed') {
  for (const group of groups.values()) {
    const ydoc = group[0].ydoc
    ydoc.transact(() => {
      const nodes = ydoc.getMap('nodes')
      for (let k = 0; k < cfg.seed_keys; k++) {
        nodes.set(`n${k}`, { x: k * 10, y: k * 7, w: 120, h: 80, text: `sticky note number ${k}` })
      }
    })
  }
  await sleep(2000)
} else {
  const started = performance.now()
  const end = started + cfg.seconds * 1000
  const interval = 1000 / cfg.rate
  for (const c of clients) c.next = started + Math.random() * interval
  if (cfg.mode === 'flood') {
    flooding = true
    refill()
    await sleep(cfg.seconds * 1000)
    flooding = false
  } else {
    await new Promise((resolve) => {
      const tick = () => {
        const now = performance.now()
        if (now >= end) return resolve()
        for (const c of clients) {
          while (c.next <= now) { send(c); c.next += interval }
        }
        setTimeout(tick, 2)
      }
      tick()
    })
  }
  sendSeconds = (performance.now() - started) / 1000
}

// Drain: wait until every peer has every edit, or until nothing arrives for 3 s.
const drainStarted = performance.now()
let last = received
let quietSince = performance.now()
while (received < expected() && performance.now() - drainStarted < cfg.drain_timeout_s * 1000) {
  await sleep(50)
  if (received !== last) { last = received; quietSince = performance.now() } else if (performance.now() - quietSince > 3000) break
}
const deliverySeconds = sendSeconds + (performance.now() - drainStarted) / 1000

latencies.sort((a, b) => a - b)
const rank = (q) => latencies.length ? latencies[Math.max(0, Math.ceil(q * latencies.length) - 1)] : null
const sent = clients.reduce((n, c) => n + c.sent, 0)
emit({
  event: 'result',
  mode: cfg.mode,
  clients: clients.length,
  docs: groups.size,
  sent,
  expected: expected(),
  received,
  closes,
  send_seconds: sendSeconds,
  delivery_seconds: deliverySeconds,
  sent_per_s: sendSeconds ? sent / sendSeconds : null,
  received_per_s: deliverySeconds ? received / deliverySeconds : null,
  p50_ms: rank(0.5),
  p99_ms: rank(0.99),
  max_ms: latencies.length ? latencies[latencies.length - 1] : null,
  cpu_s: process.cpuUsage().user / 1e6 + process.cpuUsage().system / 1e6
})

const rl = readline.createInterface({ input: process.stdin })
await new Promise((resolve) => { rl.once('line', resolve); rl.once('close', resolve) })
for (const c of clients) c.provider.destroy()
await sleep(200)
process.exit(0)
