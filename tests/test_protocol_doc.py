"""PROTOCOL.md cannot drift from the code: its examples are real messages.

Every fenced ```frames example=<type>``` block of PROTOCOL.md holds one message, one frame per line
(``<index> <name>: <base64>``). Each must decode with ``apex_zmq.wire.decode_<type>`` to the values
stated below, re-encode with ``apex_zmq.wire.encode`` to the same bytes, and be what the project's
encoder makes of those values. Every message type of ``wire.py`` has exactly one example, the
```json header=<type>``` block beside it is its decoded header, and the ```constants``` block states
the code's schema version, limits and default ports.

After a change of the wire format, regenerate the blocks with ``python tests/test_protocol_doc.py``
and paste them into PROTOCOL.md (then update its prose: the test cannot read that).
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script too

from apex_zmq import config, transport, wire  # noqa: E402

DOC = ROOT / "PROTOCOL.md"

# --------------------------------------------------------------------------- the stated values

# Three CartPole observations (cart position, cart velocity, pole angle, pole angular velocity).
OBS = np.array([[0.0125, -0.0250, 0.0375, 0.0500],
                [0.0120, 0.1700, 0.0385, -0.2300],
                [0.0154, -0.0250, 0.0339, 0.0700]], dtype=np.float32)
GAMMA = 0.99
REPLAY_INC = 0x2D1F0A9C3B47   # a replay server's incarnation (random 48-bit in real life)
LEARNER_INC = 0x5E6B2C1D9F03  # a learner's incarnation
# Two transitions: a 2-step one from obs 0 (two rewards of 1, bootstrap from obs 2 with gamma^2) and
# a 1-step one from obs 1 that terminated (discount 0; obs 2 is the final observation).
OBS_IDX, NEXT_IDX = [0, 1], [2, 2]
ACTION = [1, 0]
RET = [1.0 + GAMMA, 1.0]
DISC = [GAMMA ** 2, 0.0]
WEIGHT_NAMES = ["advantage.2.weight", "advantage.2.bias"]
WEIGHT_ARRAYS = [np.array([[0.5, -0.25, 0.125], [-1.0, 2.0, 0.0625]], dtype=np.float32),
                 np.array([0.01, -0.02], dtype=np.float32)]
# A gradient of two parameters computed at weights version 248 of LEARNER_INC on 40 agent steps.
GRADIENT_NAMES = ["policy.weight", "policy.bias"]
GRADIENT_ARRAYS = [np.array([[0.5, -0.25, 0.125], [-1.0, 2.0, 0.0625]], dtype=np.float32),
                   np.array([0.01, -0.02], dtype=np.float32)]
EPISODE = {"slot": 3, "epsilon": 0.0164, "return": 21.0, "clipped_return": 21.0, "length": 21}


def examples() -> dict[str, Any]:
    """One message of each type, built from the values above with the project's own helpers."""
    data, offsets = wire.frame_table(wire.compress_obs(OBS))
    f32 = lambda xs: np.array(xs, dtype=np.float32)  # noqa: E731
    i32 = lambda xs: np.array(xs, dtype=np.int32)  # noqa: E731
    i64 = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
    transitions = dict(obs_shape=(4,), obs_dtype="float32", frame_data=data, frame_offsets=offsets,
                       obs_idx=i32(OBS_IDX), next_idx=i32(NEXT_IDX), action=i32(ACTION), ret=f32(RET),
                       disc=f32(DISC))
    return {
        "experience": wire.ExperienceChunk(sender="actor-0", seq=17, priority=f32([0.5, 1.25]), **transitions),
        "sample": wire.SampleBatch(sender="replay", seq=42, ids=i64([7, 12]), weight=f32([1.0, 0.75]),
                                   incarnation=REPLAY_INC, **transitions),
        "priorities": wire.PriorityUpdate(sender="learner", seq=250, ids=i64([7]), priority=f32([0.3125]),
                                          incarnation=REPLAY_INC, remove=i64([12])),
        "weights": wire.Weights(sender="learner", seq=250, version=250, names=list(WEIGHT_NAMES),
                                arrays=list(WEIGHT_ARRAYS), incarnation=LEARNER_INC),
        "gradients": wire.Gradients(sender="actor-0", seq=9, version=248, names=list(GRADIENT_NAMES),
                                    arrays=list(GRADIENT_ARRAYS), dtype="float32", incarnation=LEARNER_INC,
                                    steps=40, loss=0.75, entropy=0.6875),
        "telemetry": wire.Telemetry(sender="actor-0", seq=17, role="actor", time=1700000000.25,
                                    metrics={"actor/agent_steps": 640, "actor/weights_version": 250},
                                    episodes=[dict(EPISODE)]),
    }


def frame_names(t: str, header: dict[str, Any]) -> list[str]:
    """The label of each frame of a message: ``header``, then its arrays."""
    return ["header"] + [spec[0] for spec in header.get("a", [])]


def render(t: str, frames: list[bytes]) -> str:
    """The markdown blocks of one example (what PROTOCOL.md holds)."""
    header = msgpack.unpackb(frames[0], raw=False)
    lines = [f"{i} {name}: {base64.b64encode(f).decode()}"
             for i, (name, f) in enumerate(zip(frame_names(t, header), frames))]
    return (f"```frames example={t}\n" + "\n".join(lines) + "\n```\n\n"
            f"```json header={t}\n{json.dumps(header)}\n```\n")


def as_bytes(frames) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


# --------------------------------------------------------------------------- the document


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_examples() -> dict[str, list[tuple[int, str, bytes]]]:
    """type -> [(index, name, frame bytes)] of every ```frames example=...``` block."""
    out: dict[str, list[tuple[int, str, bytes]]] = {}
    for m in re.finditer(r"^```frames example=(\w+)\n(.*?)^```", _doc(), re.S | re.M):
        t = m.group(1)
        assert t not in out, f"two examples of {t!r} in PROTOCOL.md"
        rows = []
        for line in m.group(2).splitlines():
            label, _, b64 = line.partition(":")
            index, _, name = label.strip().partition(" ")
            rows.append((int(index), name.strip(), base64.b64decode(b64.strip(), validate=True)))
        out[t] = rows
    return out


def doc_frames(t: str) -> list[bytes]:
    rows = doc_examples()[t]
    assert [r[0] for r in rows] == list(range(len(rows))), f"{t}: frame indexes must run 0, 1, 2, ..."
    return [r[2] for r in rows]


def wire_message_types() -> set[str]:
    """Every message type wire.py knows: its decoders, and the types its encoder writes."""
    decoders = {n[len("decode_"):] for n, f in vars(wire).items() if n.startswith("decode_") and callable(f)}
    encoded = set(re.findall(r'_header\(\s*"(\w+)"', inspect.getsource(wire)))
    assert decoders == encoded, f"wire.py decodes {sorted(decoders)} but encodes {sorted(encoded)}"
    return decoders


TYPES = ["experience", "sample", "priorities", "weights", "gradients", "telemetry"]


def test_every_message_type_has_one_example() -> None:
    assert wire_message_types() == set(TYPES) == set(examples())
    assert set(doc_examples()) == set(TYPES)


@pytest.mark.parametrize("t", TYPES)
def test_example_is_what_the_encoder_makes_of_the_stated_values(t: str) -> None:
    assert doc_frames(t) == as_bytes(wire.encode(examples()[t])), \
        f"PROTOCOL.md's {t} example is stale; regenerate with `python tests/test_protocol_doc.py`"


@pytest.mark.parametrize("t", TYPES)
def test_example_reencodes_to_the_same_frames(t: str) -> None:
    frames = doc_frames(t)
    decoded = getattr(wire, f"decode_{t}")(frames)
    assert as_bytes(wire.encode(decoded)) == frames


@pytest.mark.parametrize("t", TYPES)
def test_example_frame_labels_and_header_block(t: str) -> None:
    rows = doc_examples()[t]
    header = msgpack.unpackb(rows[0][2], raw=False)
    assert [r[1] for r in rows] == frame_names(t, header)
    m = re.search(rf"^```json header={t}\n(.*?)^```", _doc(), re.S | re.M)
    assert m, f"no ```json header={t}``` block"
    assert json.loads(m.group(1)) == header


def _check_transitions(msg: Any) -> None:
    assert msg.obs_shape == (4,) and msg.obs_dtype == "float32"
    assert msg.frame_offsets.dtype == np.int64 and len(msg.frame_offsets) == len(OBS) + 1
    obs = wire.decompress_frames(msg.frame_data, msg.frame_offsets, msg.obs_shape, msg.obs_dtype)
    np.testing.assert_array_equal(obs, OBS)
    assert msg.obs_idx.tolist() == OBS_IDX and msg.next_idx.tolist() == NEXT_IDX
    assert msg.action.tolist() == ACTION
    np.testing.assert_array_equal(msg.ret, np.float32(RET))
    np.testing.assert_array_equal(msg.disc, np.float32(DISC))
    assert msg.ret.dtype == msg.disc.dtype == np.float32


def test_experience_example_decodes_to_the_stated_values() -> None:
    c = wire.decode_experience(doc_frames("experience"))
    assert (c.sender, c.seq) == ("actor-0", 17)
    _check_transitions(c)
    assert c.priority.tolist() == [0.5, 1.25]


def test_sample_example_decodes_to_the_stated_values() -> None:
    s = wire.decode_sample(doc_frames("sample"))
    assert (s.sender, s.seq, s.incarnation) == ("replay", 42, REPLAY_INC)
    _check_transitions(s)
    assert s.ids.tolist() == [7, 12] and s.weight.tolist() == [1.0, 0.75]


def test_priorities_example_decodes_to_the_stated_values() -> None:
    u = wire.decode_priorities(doc_frames("priorities"))
    assert (u.sender, u.seq, u.incarnation) == ("learner", 250, REPLAY_INC)
    assert u.ids.tolist() == [7] and u.priority.tolist() == [0.3125] and u.remove.tolist() == [12]


def test_weights_example_decodes_to_the_stated_values() -> None:
    w = wire.decode_weights(doc_frames("weights"))
    assert (w.sender, w.seq, w.version, w.incarnation) == ("learner", 250, 250, LEARNER_INC)
    assert w.names == WEIGHT_NAMES
    for got, want in zip(w.arrays, WEIGHT_ARRAYS, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_gradients_example_decodes_to_the_stated_values() -> None:
    g = wire.decode_gradients(doc_frames("gradients"))
    assert (g.sender, g.seq, g.version, g.incarnation, g.dtype) == ("actor-0", 9, 248, LEARNER_INC, "float32")
    assert (g.steps, g.loss, g.entropy) == (40, 0.75, 0.6875)
    assert g.names == GRADIENT_NAMES
    for got, want in zip(g.arrays, GRADIENT_ARRAYS, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_telemetry_example_decodes_to_the_stated_values() -> None:
    t = wire.decode_telemetry(doc_frames("telemetry"))
    assert (t.sender, t.seq, t.role, t.time) == ("actor-0", 17, "actor", 1700000000.25)
    assert t.metrics == {"actor/agent_steps": 640.0, "actor/weights_version": 250.0}
    assert t.episodes == [EPISODE]


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("version", [wire.SCHEMA_VERSION - 1, wire.SCHEMA_VERSION + 1])
def test_other_schema_versions_are_refused(t: str, version: int) -> None:
    """What the document promises: a receiver refuses every other version."""
    frames = doc_frames(t)
    header = msgpack.unpackb(frames[0], raw=False)
    header["v"] = version
    with pytest.raises(wire.WireError, match="schema version"):
        getattr(wire, f"decode_{t}")([msgpack.packb(header, use_bin_type=True), *frames[1:]])


def code_constants() -> dict[str, int]:
    """The numbers the ```constants``` block must state, from the code."""
    out = {name: getattr(wire, name) for name in
           ("SCHEMA_VERSION", "MAX_HEADER_BYTES", "MAX_ARRAYS", "MAX_EPISODES", "MAX_OBS_ELEMENTS",
            "MAX_INCARNATION", "MAX_GRADIENT_ELEMENTS")}
    out["MAX_MESSAGE_BYTES"] = transport.MAX_MESSAGE_BYTES
    out.update({f"PORT_{name.upper()}": port for name, port in config.DEFAULT_PORTS.items()})
    out["PORT_RELAY"] = config.RELAY_PORT
    out["MAX_SHARDS"] = wire.MAX_SHARDS
    out["SHARD_PORT_STEP"] = config.Common.shard_port_step
    out.update(KEEPALIVE_IDLE_S=transport.KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S=transport.KEEPALIVE_INTVL_S,
               KEEPALIVE_CNT=transport.KEEPALIVE_CNT)
    return out


def test_constants_block_states_the_codes_values() -> None:
    m = re.search(r"^```constants\n(.*?)^```", _doc(), re.S | re.M)
    assert m, "no ```constants``` block in PROTOCOL.md"
    stated = {}
    for line in m.group(1).splitlines():
        name, _, value = line.partition("=")
        stated[name.strip()] = int(value.split("#")[0].strip().replace("_", ""))
    assert stated == code_constants()


def test_schema_version_everywhere_in_the_doc() -> None:
    text = _doc()
    found = re.findall(r"SCHEMA_VERSION\s*=\s*(\d+)", text) + re.findall(r"schema version (\d+)", text, re.I)
    assert found and {int(v) for v in found} == {wire.SCHEMA_VERSION}, found
    for t in TYPES:
        assert msgpack.unpackb(doc_frames(t)[0], raw=False)["v"] == wire.SCHEMA_VERSION


def test_every_wire_field_and_limit_is_named_in_the_doc() -> None:
    """Not the prose's correctness, but its coverage: every array, dtype, episode key and role."""
    text = _doc()
    for t, schema in wire._SCHEMAS.items():
        for name, dtype in schema.items():
            assert f"`{name}`" in text and dtype in text, (t, name)
    for word in (*wire.EPISODE_KEYS, *wire.ROLES, *wire._OBS_DTYPES, *wire._WEIGHT_DTYPES, *wire.GRADIENT_DTYPES):
        assert f"`{word}`" in text, word


if __name__ == "__main__":
    msgs = examples()
    for t in TYPES:
        print(render(t, as_bytes(wire.encode(msgs[t]))))
