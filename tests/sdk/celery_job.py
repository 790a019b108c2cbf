"""Sends PostHog's plugin_job task with the real celery package, as PostHog's Django did when an
operator ran a plugin job from its plugin page: send_task("posthog.tasks.plugins.plugin_job",
queue=PLUGINS_CELERY_QUEUE, args=[team_id, plugin_config_id, job_type, job_op, job_payload]).

Usage: celery_job.py REDIS_URL QUEUE TEAM_ID PLUGIN_CONFIG_ID TYPE OPERATION PAYLOAD_JSON
Prints the task id.
"""
import json
import sys

from celery import Celery

url, queue, team, config, job_type, operation, payload = sys.argv[1:8]
app = Celery("posthog", broker=url)
result = app.send_task(
    "posthog.tasks.plugins.plugin_job",
    args=[int(team), int(config), job_type, operation, json.loads(payload)],
    queue=queue,
)
print(result.id)
