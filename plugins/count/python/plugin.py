"""`count`: the number of records per key (the Rust `count` plugin's twin)."""

from wagg_sdk import Aggregation, export


class Count(Aggregation):
    name = "count"

    def initial(self, params):
        return 0

    def aggregate(self, count, record, params):
        return count + 1

    def merge(self, a, b, params):
        return a + b

    def render(self, count, params):
        return {"count": count}


WitWorld = export(Count)
