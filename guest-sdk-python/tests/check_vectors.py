"""The ABI conformance vectors (abi/conformance/vectors.jsonl) against the
Python SDK in plain CPython, without wasm: each step's batch goes through
`apply_batch` with the conformance probe, and every group's change,
failure and rendered state must be what the vector says. A fast check for
SDK work; wagg's test suite runs it, and the same vectors through the real
runtime (`wagg plugin test --conformance`).

Usage: python3 check_vectors.py <repository root>
"""

import json
import struct
import sys
from pathlib import Path

root = Path(sys.argv[1])
sys.path[:0] = [str(root / "guest-sdk-python"), str(root / "plugins/testing/conformance/python")]

import plugin  # noqa: E402  (the probe)
from wagg_sdk import apply_batch  # noqa: E402

CHANGES = {0: "unchanged", 1: "set", 2: "delete"}


def decode_result(data):
    """[(change, state bytes or None, (index, message) or None)]."""
    pos = 5
    (count,) = struct.unpack_from("<I", data, 1)
    out = []
    for _ in range(count):
        change = data[pos]
        pos += 1
        state = None
        if change == 1:
            (length,) = struct.unpack_from("<I", data, pos)
            state = data[pos + 4 : pos + 4 + length]
            pos += 4 + length
        failure = None
        if data[pos] == 1:
            index, length = struct.unpack_from("<II", data, pos + 1)
            failure = (index, data[pos + 9 : pos + 9 + length].decode())
            pos += 9 + length
        else:
            pos += 1
        out.append((CHANGES[change], state, failure))
    assert pos == len(data), "bytes after the last group"
    return out


def check_case(case):
    probe = plugin.Conformance()
    for number, step in enumerate(case["steps"], 1):
        if step["batch_hex"] is None:
            return  # carries states from an earlier step: the runtime check covers it
        results = decode_result(apply_batch(probe, {}, bytes.fromhex(step["batch_hex"])))
        assert len(results) == len(step["expect"]), f"step {number}: group count"
        for (change, state, failure), want in zip(results, step["expect"]):
            where = f"{case['name']} step {number}"
            assert change == want["change"], f"{where}: change {change}, expected {want['change']}"
            if want.get("render") is not None:
                got = probe.render(probe.decode_state(state), {})
                assert got == want["render"], f"{where}: renders {got}, expected {want['render']}"
            expected = want["failure"]
            if expected is None:
                assert failure is None, f"{where}: unexpected failure {failure}"
            else:
                assert failure is not None and failure[0] == expected["index"], f"{where}: failure {failure}"
                message = expected.get("message")
                prefix = expected.get("message_prefix") or ""
                assert failure[1] == message if message else failure[1].startswith(prefix), f"{where}: {failure}"


cases = [json.loads(line) for line in (root / "abi/conformance/vectors.jsonl").read_text().splitlines()]
for case in cases:
    check_case(case)
print(f"python sdk: {len(cases)} conformance cases ok")
