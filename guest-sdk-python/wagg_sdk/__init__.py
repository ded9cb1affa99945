"""wagg guest SDK for Python: write an aggregation plugin as one class.

Subclass `Aggregation`, implement `aggregate(state, record, params)` (it
returns the new state), and export it from your `plugin.py`:

    from wagg_sdk import Aggregation, export

    class Count(Aggregation):
        name = "count"
        def initial(self, params):
            return 0
        def aggregate(self, state, record, params):
            return state + 1

    WitWorld = export(Count)

`wagg plugin build .` turns the file into a WebAssembly component with
componentize-py. The SDK decodes the host's batches (the flat buffer the
`wit/` world specifies), keeps each key's state as compact JSON (see
`Aggregation.encode_state`), parses `params` from the config file, renders
state to JSON for queries and reports exactly which record failed: any
exception `aggregate` raises rejects that record, with its message, and the
host's `on_error` policy decides what happens next.
"""

import json
import struct

__all__ = [
    "Aggregation",
    "Record",
    "Reject",
    "apply_batch",
    "export",
    "json_pointer",
    "params_object",
    "validate_pointer",
]

ABI_VERSION = 1

_FLAG_KEY = 1
_FLAG_KEY_IS_GROUP_KEY = 2
_FLAG_VALUE = 4
_FLAG_TIMESTAMP = 8
_KNOWN_FLAGS = 15

_U32 = struct.Struct("<I")
_I32_I64 = struct.Struct("<iq")
_I64 = struct.Struct("<q")

_CHANGE_UNCHANGED = 0
_CHANGE_SET = 1
_CHANGE_DELETE = 2


class Reject(Exception):
    """Raise to reject a record (or params, from `validate`) with a message."""


class DecodeError(Exception):
    """The batch does not follow the encoding in `wit/`."""


_MISSING = object()


def json_pointer(doc, pointer, default=_MISSING):
    """The value at an RFC 6901 JSON pointer ("/order/amount") in `doc`.

    Raises `Reject` naming the pointer when there is no such field, unless a
    `default` is given.
    """
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        raise Reject(f"`{pointer}` is not a JSON pointer (it must start with /)")
    node = doc
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        elif default is _MISSING:
            raise Reject(f"field `{pointer}` is missing")
        else:
            return default
    return node


def params_object(params, required=(), optional=None):
    """`params` checked to be an object with every `required` name and no
    name outside `required` and `optional`; `optional` maps a name to its
    default. Returns a new dict with the defaults filled in."""
    optional = optional or {}
    if not isinstance(params, dict):
        raise Reject(f"params must be a table, got {_kind(params)}")
    for name in required:
        if name not in params:
            raise Reject(f"missing field `{name}`")
    for name in params:
        if name not in required and name not in optional:
            allowed = ", ".join(f"`{n}`" for n in (*required, *optional))
            raise Reject(f"unknown field `{name}`, expected one of {allowed or 'none'}")
    return {**optional, **params}


def validate_pointer(param, pointer):
    """Rejects a parameter that is not a JSON pointer (empty or "/...")."""
    if not isinstance(pointer, str) or not (pointer == "" or pointer.startswith("/")):
        raise Reject(f'`{param}` must be a JSON pointer such as "/amount", got {json.dumps(pointer)}')


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Record:
    """One Kafka record. `key` and `value` are bytes or None (a tombstone or
    a null key); `timestamp` is milliseconds since the Unix epoch or None;
    `headers` is a list of (name, bytes or None) in record order."""

    __slots__ = ("key", "value", "timestamp", "partition", "offset", "headers", "_json")

    def __init__(self, key, value, timestamp, partition, offset, headers):
        self.key = key
        self.value = value
        self.timestamp = timestamp
        self.partition = partition
        self.offset = offset
        self.headers = headers
        self._json = _MISSING

    def header(self, name):
        """The value of the first header called `name` (bytes or None), or
        None when there is none."""
        for header_name, value in self.headers:
            if header_name == name:
                return value
        return None

    def value_str(self):
        """The value as text; rejects tombstones and invalid UTF-8."""
        if self.value is None:
            raise Reject("record has no value (tombstone)")
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"value is not UTF-8: {e}") from None

    def value_json(self):
        """The value parsed as JSON (parsed once per record)."""
        if self._json is _MISSING:
            if self.value is None:
                raise Reject("record has no value (tombstone)")
            try:
                self._json = json.loads(self.value)
            except ValueError as e:
                raise Reject(f"value is not valid JSON: {e}") from None
        return self._json

    def value_field(self, pointer):
        """The JSON value at `pointer` in the value; rejects when missing."""
        return json_pointer(self.value_json(), pointer)

    def value_number(self, pointer):
        """The number at `pointer` in the value, as a float; rejects a
        missing field or one that is not a number."""
        found = self.value_field(pointer)
        if isinstance(found, bool) or not isinstance(found, (int, float)):
            raise Reject(f"field `{pointer}` is {_kind(found)}, not a number")
        return float(found)


class Aggregation:
    """What a plugin author implements. Override `aggregate`; the rest has
    defaults.

    Class attributes: `name` (shown by `wagg plugin inspect`), `version`,
    `state_format` (bump it when `encode_state`'s output changes so that an
    older version's states can no longer be read) and `migrates_from` (the
    older formats `migrate` reads).
    """

    name = "unnamed"
    version = "0.1.0"
    state_format = 1
    migrates_from = ()

    def parse_params(self, params):
        """The params the other methods get, from the config's `params`
        table (a dict). Raise `Reject` naming a wrong parameter."""
        return params

    def validate(self, params):
        """Checks the parsed params; raise `Reject` naming what is wrong."""

    def initial(self, params):
        """The state of a key seen for the first time."""
        return None

    def aggregate(self, state, record, params):
        """Folds `record` into `state` and returns the new state. Raising
        rejects the record: the key keeps the state from before it."""
        raise NotImplementedError("aggregate")

    def keep(self, state, params):
        """Whether to keep the key after a batch's records; False deletes it."""
        return True

    def render(self, state, params):
        """The JSON-able document a query for the key returns."""
        return state

    # `merge(self, a, b, params)`: define it to support session windows; it
    # must equal aggregating `a`'s records and then `b`'s.
    merge = None

    def migrate(self, from_format, state_bytes):
        """A state an older version (format `from_format`, one of
        `migrates_from`) wrote, as this version's state."""
        raise Reject(f"`{self.name}` does not migrate state format {from_format}")

    def encode_state(self, state):
        """The bytes stored for `state`. Compact JSON: self-describing, so a
        later version that adds a field can read an older state (use
        `state.get("field", default)`) without changing `state_format`, and
        floats round-trip exactly."""
        return json.dumps(state, separators=(",", ":"), allow_nan=True).encode()

    def decode_state(self, data):
        """The state `encode_state` wrote."""
        return json.loads(data)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n):
        end = self.pos + n
        if end > len(self.buf):
            raise DecodeError(f"truncated at byte {self.pos}: {n} more bytes expected")
        chunk = self.buf[self.pos:end]
        self.pos = end
        return chunk

    def u8(self):
        if self.pos >= len(self.buf):
            raise DecodeError(f"truncated at byte {self.pos}")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u32(self):
        value = _U32.unpack_from(self.buf, self.pos)[0] if self.pos + 4 <= len(self.buf) else None
        if value is None:
            raise DecodeError(f"truncated at byte {self.pos}")
        self.pos += 4
        return value

    def bytes(self):
        return bytes(self.take(self.u32()))

    def flag(self, what):
        value = self.u8()
        if value > 1:
            raise DecodeError(f"{what} flag is {value}, expected 0 or 1")
        return value == 1


def _read_record(reader, group_key):
    flags = reader.u8()
    if flags & ~_KNOWN_FLAGS:
        raise DecodeError(f"unknown record flags {flags:#x}")
    key = None
    if flags & _FLAG_KEY:
        key = group_key if flags & _FLAG_KEY_IS_GROUP_KEY else reader.bytes()
    value = reader.bytes() if flags & _FLAG_VALUE else None
    timestamp = _I64.unpack(reader.take(8))[0] if flags & _FLAG_TIMESTAMP else None
    partition, offset = _I32_I64.unpack(reader.take(12))
    headers = []
    for _ in range(reader.u32()):
        name = reader.take(reader.u32())
        try:
            name = bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("header name is not UTF-8") from None
        headers.append((name, reader.bytes() if reader.flag("header value") else None))
    return Record(key, value, timestamp, partition, offset, headers)


def _read_group(reader):
    key = reader.bytes()
    state = reader.bytes() if reader.flag("state") else None
    count = reader.u32()
    if count == 0:
        raise DecodeError("a group has no records")
    return key, state, [_read_record(reader, key) for _ in range(count)]


def _describe(error):
    if isinstance(error, Reject):
        return str(error)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _apply_group(agg, params, stored, records):
    """(change, encoded state or None, (index, message) or None)."""
    try:
        state = agg.initial(params) if stored is None else agg.decode_state(stored)
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        message = f"stored state could not be decoded as state format {agg.state_format} of `{agg.name}`: {_describe(e)}"
        return _CHANGE_UNCHANGED, None, (0, message)
    applied = 0
    failure = None
    for record in records:
        try:
            state = agg.aggregate(state, record, params)
        except Exception as e:  # noqa: BLE001
            failure = (applied, _describe(e))
            break
        applied += 1
    if failure is not None and applied > 0:
        # `aggregate` may have changed the state in place before it raised:
        # rebuild it from exactly the records before the failing one.
        try:
            state = agg.initial(params) if stored is None else agg.decode_state(stored)
            for record in records[:applied]:
                state = agg.aggregate(state, record, params)
        except Exception as e:  # noqa: BLE001
            return _CHANGE_UNCHANGED, None, (0, f"aggregate is not deterministic: {_describe(e)}")
    if applied == 0:
        return _CHANGE_UNCHANGED, None, failure
    try:
        if not agg.keep(state, params):
            return _CHANGE_DELETE, None, failure
        return _CHANGE_SET, agg.encode_state(state), failure
    except Exception as e:  # noqa: BLE001
        return _CHANGE_UNCHANGED, None, (0, f"state could not be encoded: {_describe(e)}")


def apply_batch(agg, params, batch):
    """Applies an encoded batch and returns the encoded result (bytes).
    Raises `DecodeError` when the batch is malformed."""
    reader = _Reader(memoryview(batch))
    version = reader.u8()
    if version != ABI_VERSION:
        raise DecodeError(f"abi version {version}, this SDK speaks {ABI_VERSION}")
    groups = reader.u32()
    out = bytearray()
    out.append(ABI_VERSION)
    out += _U32.pack(groups)
    for _ in range(groups):
        key, stored, records = _read_group(reader)
        change, state, failure = _apply_group(agg, params, stored, records)
        out.append(change)
        if change == _CHANGE_SET:
            out += _U32.pack(len(state))
            out += state
        if failure is None:
            out.append(0)
        else:
            message = failure[1].encode("utf-8", "replace")
            out.append(1)
            out += _U32.pack(failure[0])
            out += _U32.pack(len(message))
            out += message
    if reader.pos != len(reader.buf):
        raise DecodeError(f"{len(reader.buf) - reader.pos} bytes after the last group")
    return bytes(out)


def export(aggregation_class):
    """The `WitWorld` class componentize-py exports for `aggregation_class`:
    assign it to `WitWorld` in your plugin module. The component's modules
    are imported only when called, so the plugin module also imports in
    plain Python (for unit tests of the aggregation)."""
    agg = aggregation_class()
    configured = {}

    def Err(message):  # noqa: N802 - stands for componentize-py's Err
        from componentize_py_types import Err as ComponentErr

        return ComponentErr(message)

    def params():
        if "params" not in configured:
            raise Err("called before configure")
        return configured["params"]

    def fail(what, error):
        raise Err(f"{what}: {_describe(error)}")

    class WitWorld:
        def metadata(self):
            import wit_world

            return wit_world.Metadata(agg.name, agg.version, agg.state_format)

        def configure(self, params_json):
            try:
                parsed = agg.parse_params(json.loads(params_json))
                agg.validate(parsed)
            except Exception as e:  # noqa: BLE001
                fail(f"invalid params for `{agg.name}`", e)
            configured["params"] = parsed

        def apply(self, batch):
            current = params()
            try:
                return apply_batch(agg, current, batch)
            except DecodeError as e:
                fail("batch could not be decoded", e)

        def render(self, state):
            current = params()
            try:
                document = agg.render(agg.decode_state(state), current)
                return json.dumps(document, separators=(",", ":"), allow_nan=False)
            except Exception as e:  # noqa: BLE001
                fail("render failed", e)

        def merges(self):
            return agg.merge is not None

        def merge(self, a, b):
            current = params()
            if agg.merge is None:
                raise Err(f"`{agg.name}` does not merge states")
            try:
                merged = agg.merge(agg.decode_state(a), agg.decode_state(b), current)
                return agg.encode_state(merged)
            except Exception as e:  # noqa: BLE001
                fail("merge failed", e)

        def migrates_from(self):
            return list(agg.migrates_from)

        def migrate(self, from_format, state):
            if from_format not in agg.migrates_from:
                raise Err(f"`{agg.name}` (state format {agg.state_format}) does not migrate from state format {from_format}")
            try:
                return agg.encode_state(agg.migrate(from_format, state))
            except Exception as e:  # noqa: BLE001
                fail("migrate failed", e)

    return WitWorld
