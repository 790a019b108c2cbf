// Drives the real posthog-js browser SDK (the CDN bundle) in jsdom against a running appliance,
// the way a page on another origin does: XHR with credentials, CORS, /decide/ or /flags/, batching.
// Usage: node browser_sdk.mjs HOST TOKEN RUN_ID current|legacy
// Prints, as JSON, the status of every request the page made and any page errors; exits 1 on
// page errors.
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { JSDOM, VirtualConsole } from 'jsdom'

const require = createRequire(import.meta.url)
const [host, token, run, variant] = process.argv.slice(2)
const bundle = variant === 'legacy' ? 'posthog-js-legacy/dist/array.full.js' : 'posthog-js/dist/array.full.js'

const errors = []
const console_ = new VirtualConsole()
console_.on('jsdomError', (e) => errors.push(`jsdom: ${e.message}`))
console_.on('error', (...args) => errors.push(`console.error: ${args.join(' ')}`))

const dom = new JSDOM('<!doctype html><html><head><title>Shop</title></head><body><button id="buy">Buy</button></body></html>', {
  url: 'https://shop.example.com/products/42?utm_source=newsletter',
  runScripts: 'outside-only',
  pretendToBeVisual: true,
  virtualConsole: console_,
})
// Record what the page's requests saw: a CORS failure shows as status 0, which makes the SDK
// retry (and, against a server that does not deduplicate, store events twice).
const responses = []
const xhr = dom.window.XMLHttpRequest.prototype
const open = xhr.open
xhr.open = function (method, url, ...rest) {
  this.addEventListener('loadend', () => responses.push({ method, path: new URL(url).pathname, status: this.status }))
  return open.call(this, method, url, ...rest)
}
dom.window.eval(readFileSync(require.resolve(bundle), 'utf8'))
const posthog = dom.window.posthog

const user = `js-${variant}-${run}`
posthog.init(token, {
  api_host: host,
  persistence: 'memory',
  autocapture: false,
  disable_session_recording: true,
  capture_pageview: true,
})
posthog.capture('movie played', { movie_id: 123 })
posthog.identify(user, { plan: 'pro' }, { first_seen: 'today' })
posthog.capture('purchase', { amount: 9.5 })

// Batched events are flushed by a timer (3 s); give the SDK time to send and to retry once.
await new Promise((resolve) => setTimeout(resolve, 7000))
console.log(JSON.stringify({ user, responses, errors }))
dom.window.close()
process.exit(errors.length ? 1 : 0)
