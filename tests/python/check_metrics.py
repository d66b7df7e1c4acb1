"""Parses Prometheus text exposition with the reference Python parser; prints family names."""
import sys

from prometheus_client.parser import text_string_to_metric_families

names = sorted({family.name for family in text_string_to_metric_families(sys.argv[1])})
if not names:
    raise SystemExit("no metric families")
print("\n".join(names))
