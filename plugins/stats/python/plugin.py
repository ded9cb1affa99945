"""`stats`: count, min, max, mean and population variance of a numeric field
per key, with Welford's algorithm (the Rust `stats` plugin's twin).

Params: `field`, a JSON pointer into the record value (e.g. "/amount").
A record whose field is missing or not a number is rejected.
"""

from wagg_sdk import Aggregation, export, params_object, validate_pointer


class Stats(Aggregation):
    name = "stats"

    def parse_params(self, params):
        params = params_object(params, required=("field",))
        validate_pointer("field", params["field"])
        return params

    def initial(self, params):
        # [count, min, max, mean, m2]: a list keeps the stored JSON small.
        return [0, 0.0, 0.0, 0.0, 0.0]

    def aggregate(self, state, record, params):
        x = record.value_number(params["field"])
        count, low, high, mean, m2 = state
        if count == 0:
            low = high = x
        else:
            low, high = min(low, x), max(high, x)
        count += 1
        delta = x - mean
        mean += delta / count
        m2 += delta * (x - mean)
        return [count, low, high, mean, m2]

    def merge(self, a, b, params):
        """Chan et al.'s parallel combination of two sets of moments."""
        if a[0] == 0:
            return b
        if b[0] == 0:
            return a
        count = a[0] + b[0]
        delta = b[3] - a[3]
        return [
            count,
            min(a[1], b[1]),
            max(a[2], b[2]),
            a[3] + delta * b[0] / count,
            a[4] + b[4] + delta * delta * a[0] * b[0] / count,
        ]

    def render(self, state, params):
        count, low, high, mean, m2 = state
        return {
            "count": count,
            "min": low,
            "max": high,
            "mean": mean,
            "variance": m2 / count if count else 0.0,
        }


WitWorld = export(Stats)
