"""`top-n`: the N best items per key by a numeric field (the Rust `top-n`
plugin's twin).

Params: `n` (1..=1000), `field` (JSON pointer to the score) and `item`
(optional pointer to what is ranked; without it, whole records are ranked,
and one item can appear once, with its best score).
"""

import json

from wagg_sdk import Aggregation, Reject, export, params_object, validate_pointer

MAX_N = 1000


def canonical(value):
    """The JSON text that identifies an item (keys sorted, no spaces)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def rank(entry):
    """Best score first; equal scores by item text."""
    score, item = entry
    return (-score, item)


class TopN(Aggregation):
    name = "top-n"

    def parse_params(self, params):
        params = params_object(params, required=("n", "field"), optional={"item": None})
        n = params["n"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise Reject(f"`n` must be between 1 and {MAX_N}, got {json.dumps(n)}")
        validate_pointer("field", params["field"])
        if params["item"] is not None:
            validate_pointer("item", params["item"])
        return params

    def initial(self, params):
        return []  # [score, item text] pairs, best first

    def aggregate(self, entries, record, params):
        score = record.value_number(params["field"])
        if params["item"] is not None:
            item = canonical(record.value_field(params["item"]))
            for index, (existing, text) in enumerate(entries):
                if text == item:
                    if existing >= score:
                        return entries
                    del entries[index]
                    break
        else:
            item = canonical(record.value_json())
        entries.append([score, item])
        entries.sort(key=rank)
        del entries[params["n"]:]
        return entries

    def merge(self, a, b, params):
        entries = a
        for score, item in b:
            same = [e for e in entries if e[1] == item] if params["item"] is not None else []
            if same:
                same[0][0] = max(same[0][0], score)
            else:
                entries.append([score, item])
        entries.sort(key=rank)
        return entries[: params["n"]]

    def render(self, entries, params):
        return {"top": [{"item": json.loads(item), "score": score} for score, item in entries]}


WitWorld = export(TopN)
