"""Writes a small MaxMind DB in the GeoIP2 City layout, with an independent writer
(mmdb-writer), for the tests to locate addresses with: python3 make_mmdb.py OUT [moved].
With "moved", 203.0.113.0/24 is in Rotterdam instead of Amsterdam (a replaced database)."""
import sys

from mmdb_writer import MMDBWriter
from netaddr import IPSet

moved = len(sys.argv) > 2 and sys.argv[2] == "moved"
city = "Rotterdam" if moved else "Amsterdam"
writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City", languages=["en"])
writer.insert_network(
    IPSet(["203.0.113.0/24"]),
    {
        "city": {"names": {"en": city, "nl": city}},
        "continent": {"code": "EU", "names": {"en": "Europe"}},
        "country": {"iso_code": "NL", "names": {"en": "Netherlands"}},
        "location": {
            "latitude": 52.3676,
            "longitude": 4.9041,
            "time_zone": "Europe/Amsterdam",
            "accuracy_radius": 20,
        },
        "postal": {"code": "1012"},
        "subdivisions": [
            {"iso_code": "NH", "names": {"en": "North Holland"}},
            {"iso_code": "AMS", "names": {"en": "Amsterdam-Amstelland"}},
        ],
    },
)
writer.insert_network(
    IPSet(["2001:db8::/32"]),
    {"country": {"iso_code": "JP", "names": {"en": "Japan"}}, "continent": {"code": "AS"}},
)
writer.to_db_file(sys.argv[1])
