"""Writes a small MaxMind DB in the GeoIP2 City layout, with an independent writer
(mmdb-writer), for tests/plugins.rs to locate addresses with: python3 make_mmdb.py OUT."""
import sys

from mmdb_writer import MMDBWriter
from netaddr import IPSet

writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City", languages=["en"])
writer.insert_network(
    IPSet(["203.0.113.0/24"]),
    {
        "city": {"names": {"en": "Amsterdam", "nl": "Amsterdam"}},
        "continent": {"code": "EU", "names": {"en": "Europe"}},
        "country": {"iso_code": "NL", "names": {"en": "Netherlands"}},
        "location": {"latitude": 52.3676, "longitude": 4.9041, "time_zone": "Europe/Amsterdam"},
        "postal": {"code": "1012"},
        "subdivisions": [{"iso_code": "NH", "names": {"en": "North Holland"}}],
    },
)
writer.insert_network(
    IPSet(["2001:db8::/32"]),
    {"country": {"iso_code": "JP", "names": {"en": "Japan"}}, "continent": {"code": "AS"}},
)
writer.to_db_file(sys.argv[1])
