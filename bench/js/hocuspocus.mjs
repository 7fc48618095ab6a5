// Hocuspocus with its SQLite extension at default settings, as a peer for bench/gateway.py.
//
// Usage: node hocuspocus.mjs --port PORT --database FILE
// Prints "listening" on stdout once the port is open. Documents are stored by the extension's
// onStoreDocument, which Hocuspocus debounces (2 s after the last change, at most every 10 s).

import { parseArgs } from 'node:util'
import { Server } from '@hocuspocus/server'
import { SQLite } from '@hocuspocus/extension-sqlite'

console.log = console.error

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, database: { type: 'string' } }
})
if (!args.port || !args.database) {
  console.error('usage: hocuspocus.mjs --port PORT --database FILE')
  process.exit(2)
}

const server = new Server({
  port: Number(args.port),
  address: '127.0.0.1',
  quiet: true,
  extensions: [new SQLite({ database: args.database })]
})
// listen() installs Hocuspocus's own SIGTERM/SIGINT handlers (destroy, which stores every document).
await server.listen()
process.stdout.write('listening\n')
