// Drives the real posthog-node SDK against a running appliance.
// Usage: node node_sdk.mjs HOST TOKEN RUN_ID
// Prints, as JSON, the events it sent (event, distinct_id); exits 1 if the SDK reported an error.
import { PostHog } from 'posthog-node'

const [host, token, run] = process.argv.slice(2)
const errors = []
const sent = []
const user = `node-user-${run}`

async function session(options, send) {
  const client = new PostHog(token, { host, ...options })
  client.on('error', (err) => errors.push(String(err)))
  send(client)
  await client.shutdown()
}

// One request per call, plain JSON.
await session({ flushAt: 1, flushInterval: 0, disableCompression: true }, (c) => {
  c.capture({ distinctId: user, event: 'movie played', properties: { movie_id: 123 } })
  sent.push({ event: 'movie played', distinct_id: user })
  c.identify({ distinctId: user, properties: { $set: { plan: 'pro' }, $set_once: { first_seen: 'today' } } })
  sent.push({ event: '$identify', distinct_id: user })
  c.alias({ distinctId: user, alias: `node-alias-${run}` })
  sent.push({ event: '$create_alias', distinct_id: user })
  c.groupIdentify({ groupType: 'company', groupKey: `acme-${run}`, properties: { size: 10 } })
  sent.push({ event: '$groupidentify', distinct_id: `$company_acme-${run}` })
})

// Default settings: batched and gzip-compressed.
await session({ flushAt: 20 }, (c) => {
  for (let n = 0; n < 25; n++) {
    c.capture({ distinctId: user, event: 'page viewed', properties: { n } })
    sent.push({ event: 'page viewed', distinct_id: user })
  }
})

console.log(JSON.stringify({ sent, errors }))
process.exit(errors.length ? 1 : 0)
