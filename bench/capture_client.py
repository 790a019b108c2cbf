"""Sends N posthog-js-shaped single events to <url>/e/ one after another on one keep-alive
connection, each with a fresh uuid; fails loudly on any answer but 200.

    python3 bench/capture_client.py URL TOKEN N
"""

import http.client
import json
import sys
import urllib.parse
import uuid


def event(token: str, n: int) -> bytes:
    return json.dumps(
        {
            "event": "$pageview",
            "distinct_id": f"user-{n % 1000}",
            "uuid": str(uuid.uuid4()),
            "properties": {
                "token": token,
                "$current_url": f"https://example.com/page/{n % 50}",
                "$host": "example.com",
                "$pathname": f"/page/{n % 50}",
                "$browser": "Chrome",
                "$browser_version": 131,
                "$os": "Mac OS X",
                "$os_version": "10.15.7",
                "$device_type": "Desktop",
                "$screen_height": 1080,
                "$screen_width": 1920,
                "$viewport_height": 960,
                "$viewport_width": 1800,
                "$lib": "web",
                "$lib_version": "1.200.0",
                "$referrer": "$direct",
                "$session_id": "0193a0b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b",
                "$window_id": "0193a0b2-5c6d-7e8f-9a0b-1c2d3e4f5a6c",
            },
        }
    ).encode()


def main() -> None:
    url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    for n in range(count):
        connection.request(
            "POST", "/e/", body=event(token, n), headers={"Content-Type": "application/json"}
        )
        answer = connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            sys.exit(f"capture_client: request {n} answered {answer.status}: {body[:200]!r}")


if __name__ == "__main__":
    main()
