"""Drives the real posthog-python SDK against a running appliance.

Usage: python3 python_sdk.py HOST TOKEN RUN_ID
Prints, as JSON, the events it sent (uuid, event, distinct_id); exits 1 if the SDK reported an
error for any request.
"""
import json
import sys

from posthog import Posthog

host, token, run = sys.argv[1:4]
errors = []
sent = []


def on_error(error, items):
    errors.append(repr(error))


def record(uuid, event, distinct_id):
    if not uuid:
        errors.append(f"no uuid returned for {event}")
    sent.append({"uuid": uuid, "event": event, "distinct_id": distinct_id})


user = f"py-user-{run}"
# One request per call, plain JSON, as in the recorded fixtures.
client = Posthog(token, host=host, sync_mode=True, on_error=on_error)
record(client.capture("movie played", distinct_id=user, properties={"movie_id": 123, "category": "thriller"}), "movie played", user)
record(client.set(distinct_id=user, properties={"plan": "pro"}), "$set", user)
record(client.set_once(distinct_id=user, properties={"first_seen": "today"}), "$set_once", user)
# alias() sends the event as the previous id.
record(client.alias(previous_id=f"py-anon-{run}", distinct_id=user), "$create_alias", f"py-anon-{run}")
record(
    client.capture("purchase", distinct_id=user, properties={"amount": 9.5}, groups={"company": "acme"}, timestamp="2024-01-02T03:04:05Z"),
    "purchase",
    user,
)
client.shutdown()

# A background batch, gzip-compressed.
batched = Posthog(token, host=host, gzip=True, flush_at=100, on_error=on_error)
for n in range(25):
    record(batched.capture("page viewed", distinct_id=user, properties={"n": n}), "page viewed", user)
batched.flush()
batched.shutdown()

print(json.dumps({"sent": sent, "errors": errors}))
sys.exit(1 if errors else 0)
