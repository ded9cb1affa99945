"""`conformance`: the ABI conformance probe (see the Rust crate beside this
directory for what each line holds)."""

from wagg_sdk import Aggregation, Reject, export


def hex_or_dash(data):
    return "-" if data is None else data.hex()


def describe(record):
    headers = ",".join(f"{name}={hex_or_dash(value)}" for name, value in record.headers)
    timestamp = "-" if record.timestamp is None else str(record.timestamp)
    return (
        f"p{record.partition}@{record.offset} k={hex_or_dash(record.key)} "
        f"v={hex_or_dash(record.value)} t={timestamp} h=[{headers}]"
    )


class Conformance(Aggregation):
    name = "conformance"

    def initial(self, params):
        return []

    def aggregate(self, lines, record, params):
        if record.value == b"reject":
            lines.append("rejected record")  # changed before failing: the SDK must undo it
            raise Reject(f"rejected p{record.partition}@{record.offset}")
        if record.value == b"delete":
            return []
        lines.append(describe(record))
        return lines

    def keep(self, lines, params):
        return len(lines) > 0

    def render(self, lines, params):
        return {"records": lines}


WitWorld = export(Conformance)
