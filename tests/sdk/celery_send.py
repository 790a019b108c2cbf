"""Sends PostHog's ingestion tasks with the real celery package, as PostHog's Django capture
did: send_task("posthog.tasks.process_event.process_event_with_plugins",
args=[distinct_id, ip, site_url, event, team_id, now.isoformat(), sent_at]).

Usage: celery_send.py REDIS_URL QUEUE TEAM_ID COUNT PROTOCOL FIRST
Prints one JSON line per task: {"task_id", "i"}.
"""
import datetime
import json
import sys

from celery import Celery

url, queue, team, count, protocol, first = sys.argv[1:7]
app = Celery("posthog", broker=url)
app.conf.task_protocol = int(protocol)
# Fixed times, so a test can tell the task's `now` is the one clock-skew correction uses: the
# server received the event one second before the client says it sent it.
now = datetime.datetime(2026, 12, 2, 0, 0, 0)
sent_at = datetime.datetime(2026, 12, 2, 0, 0, 1, tzinfo=datetime.timezone.utc)
for i in range(int(first), int(first) + int(count)):
    event = {
        "event": "celery event",
        "properties": {"i": i, "$current_url": "http://localhost/page"},
        "timestamp": "2026-11-02T10:00:00.000000+00:00",
    }
    result = app.send_task(
        "posthog.tasks.process_event.process_event_with_plugins",
        args=[f"user{i % 7}", "1.2.3.4", "http://localhost", event, int(team), now.isoformat(), sent_at],
        queue=queue,
    )
    print(json.dumps({"task_id": result.id, "i": i}))
