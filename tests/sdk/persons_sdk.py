"""Drives the real posthog-python SDK through PostHog's person scenarios, one request per call
and in order (the order persons are updated in).

Usage: python3 persons_sdk.py HOST TOKEN
Prints, as JSON, the events it sent ({uuid, event, distinct_id}); exits 1 if the SDK reported an
error for any request.
"""
import json
import sys

from posthog import Posthog

host, token = sys.argv[1:3]
errors = []
sent = []


def on_error(error, items):
    errors.append(repr(error))


client = Posthog(token, host=host, sync_mode=True, on_error=on_error)


def capture(event, distinct_id, properties=None, **kwargs):
    uuid = client.capture(event, distinct_id=distinct_id, properties=properties or {}, **kwargs)
    sent.append({"uuid": uuid, "event": event, "distinct_id": distinct_id})


def person_set(distinct_id, properties):
    sent.append({"uuid": client.set(distinct_id=distinct_id, properties=properties), "event": "$set", "distinct_id": distinct_id})


def person_set_once(distinct_id, properties):
    sent.append({"uuid": client.set_once(distinct_id=distinct_id, properties=properties), "event": "$set_once", "distinct_id": distinct_id})


# 1. Anonymous browsing, then login.
capture("$pageview", "anon-1", {"$browser": "Firefox", "$current_url": "https://shop.example/1"})
person_set("anon-1", {"plan": "free"})
capture("$identify", "user-1", {"$anon_distinct_id": "anon-1", "$set": {"email": "one@example.com"}})
capture("$pageview", "user-1")

# 2. Two devices, then login on both.
capture("$pageview", "phone-2", {"$set": {"device": "phone"}})
capture("$identify", "user-2", {"$anon_distinct_id": "phone-2"})
capture("$pageview", "laptop-2", {"$set": {"device": "laptop", "laptop_only": True}})
capture("$identify", "user-2", {"$anon_distinct_id": "laptop-2"})

# 3. An alias onto an identified user is refused; 4. $merge_dangerously is not.
capture("$identify", "user-3", {"$anon_distinct_id": "anon-3"})
capture("$identify", "user-4", {"$anon_distinct_id": "anon-4", "$set": {"four": True}})
sent.append({"uuid": client.alias(previous_id="user-3", distinct_id="user-4"), "event": "$create_alias", "distinct_id": "user-3"})
capture("$merge_dangerously", "user-3", {"alias": "user-4"})

# 5. Illegal ids never merge (the events are still stored).
capture("$identify", "user-5", {"$anon_distinct_id": "undefined"})
capture("$pageview", "null")

# 6. Personless events, then login.
capture("$pageview", "anon-6", {"$process_person_profile": False, "$set": {"ignored": True}})
capture("$identify", "anon-6", {"$process_person_profile": False})
capture("$identify", "user-6", {"$anon_distinct_id": "anon-6"})

# 7. $set, $set_once and $unset across events.
person_set_once("user-7", {"first": 1})
person_set("user-7", {"s": 1, "gone": 1})
person_set_once("user-7", {"first": 2, "second": 2})
capture("unset", "user-7", {"$unset": ["gone"]})
person_set("user-7", {"s": 2})

# 8. Groups.
sent.append({"uuid": client.group_identify("company", "acme", {"size": 10}, distinct_id="user-7"), "event": "$groupidentify", "distinct_id": "user-7"})
capture("purchase", "user-7", {"amount": 5}, groups={"company": "acme"})

client.shutdown()
print(json.dumps({"sent": sent, "errors": errors}))
sys.exit(1 if errors else 0)
