// The job benchmark's workload on Graphile Worker 0.17.3: no-op jobs added in bulk (addJobs, in
// chunks of 10,000) and run to the last by one worker with 20 concurrent jobs, using the
// settings Graphile's own performance page benchmarks with (a local queue, batched completion).
// Usage: node bench.mjs <postgres connection string> <size,size,...>
import { Logger, makeWorkerUtils, run } from "graphile-worker";

// Graphile logs every completed job at info level; the appliance logs none: keep both quiet.
const logger = new Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});

const [connectionString, sizesArg] = process.argv.slice(2);
const sizes = (sizesArg || "1000,10000,100000").split(",").map(Number);
const preset = {
  worker: {
    connectionString,
    concurrentJobs: 20,
    maxPoolSize: 21,
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
    pollInterval: 1000,
  },
};

const utils = await makeWorkerUtils({ connectionString, logger });
await utils.migrate();
console.log("   queued     enqueue/s     execute/s      enq+exec/s   (graphile-worker 0.17.3)");
for (const size of sizes) {
  await utils.withPgClient((c) => c.query("delete from graphile_worker._private_jobs"));
  let done = 0;
  let finished;
  const allDone = new Promise((resolve) => (finished = resolve));
  const started = process.hrtime.bigint();
  for (let i = 0; i < size; i += 10000) {
    const n = Math.min(10000, size - i);
    await utils.addJobs(Array.from({ length: n }, () => ({ identifier: "noop", payload: {} })));
  }
  const enqueued = process.hrtime.bigint();
  const runner = await run({
    preset,
    logger,
    noHandleSignals: true,
    taskList: {
      noop: async () => {
        done += 1;
        if (done === size) finished();
      },
    },
  });
  await allDone;
  await runner.stop();
  const ended = process.hrtime.bigint();
  const left = await utils.withPgClient((c) =>
    c.query("select count(*)::int as n from graphile_worker._private_jobs"),
  );
  if (left.rows[0].n !== 0) {
    console.error(`graphile-worker left ${left.rows[0].n} jobs in its table; this run does not count`);
    process.exit(1);
  }
  const secs = (a, b) => Number(b - a) / 1e9;
  const pad = (v) => String(Math.round(v)).padStart(12);
  console.log(
    `${String(size).padStart(9)}  ${pad(size / secs(started, enqueued))}  ${pad(size / secs(enqueued, ended))}  ${pad(size / secs(started, ended)).padStart(14)}`,
  );
}
await utils.release();
