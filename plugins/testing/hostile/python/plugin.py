"""`hostile` in Python: counts records per key, and misbehaves on every
record whose value is "bad", as `params.mode` says: `loop` (forever),
`alloc` (memory without bound), `raise` (an unexpected exception)."""

from wagg_sdk import Aggregation, export, params_object


class Hostile(Aggregation):
    name = "hostile-python"

    def parse_params(self, params):
        return params_object(params, required=("mode",))

    def initial(self, params):
        return 0

    def aggregate(self, count, record, params):
        if record.value != b"bad":
            return count + 1
        mode = params["mode"]
        if mode == "loop":
            while True:
                pass
        if mode == "alloc":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if mode == "raise":
            raise RuntimeError(f"hostile plugin raised on offset {record.offset}")
        raise ValueError(f"unknown mode {mode}")

    def render(self, count, params):
        return {"count": count}


WitWorld = export(Hostile)
