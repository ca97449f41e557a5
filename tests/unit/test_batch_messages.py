"""What a batch writes is what Celery and py-amqp would: ``flat_repr`` against Celery's
``saferepr`` (producers/messages.py), and the batch's frame encoder against py-amqp's own
``frame_writer`` (producers/amqp_frames.py), byte for byte."""

from __future__ import annotations

import copy
import datetime
import random
import string
from decimal import Decimal

import amqp
import pytest
from celery.utils.saferepr import saferepr

from producers.amqp_frames import FrameEncoder, reference_frames
from producers.messages import flat_repr

ALPHABET = string.printable + "'\"\\é\u2028\x00 \ud800"


def _text(rnd: random.Random) -> str:
    return "".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(0, 30)))


def _scalar(rnd: random.Random):
    r = rnd.random()
    if r < 0.5:
        return _text(rnd)
    if r < 0.75:
        return rnd.randint(-10**12, 10**12)
    if r < 0.95:
        return rnd.uniform(-1e10, 1e10)
    return rnd.choice([float("inf"), float("nan"), -0.0, 1e300, True, None, b"x", [1]])


def test_flat_repr_is_celerys_saferepr_wherever_it_answers():
    rnd = random.Random(19)
    answered = 0
    for _ in range(3000):
        items = [_scalar(rnd) for _ in range(rnd.randint(0, 20))]
        kind = rnd.random()
        value = (items if kind < 0.4 else tuple(items) if kind < 0.7 else
                 {_text(rnd): v for v in items})
        for maxlen in (1024, 40, 3, 1, None):
            for levels in (3, 1, 0):
                text = flat_repr(value, maxlen, levels)
                if text is not None:
                    answered += 1
                    assert text == saferepr(value, maxlen, maxlevels=levels), (value, maxlen)
    assert answered > 5000  # it answers for most flat values


@pytest.mark.parametrize("value", [[], (), {}, ("a",), ["it's"], {"k": 1.5}, [1, -2, "x"]])
def test_flat_repr_of_small_values(value):
    assert flat_repr(value, 1024, 3) == saferepr(value, 1024, maxlevels=3)


@pytest.mark.parametrize("value", [[[1]], ["a", None], [True], {1: "a"}, "text", 5,
                                   ["x" * 2000]])
def test_flat_repr_leaves_the_rest_to_saferepr(value):
    assert flat_repr(value, 1024, 3) is None


def _headers(task_id: str, args: str) -> dict:
    """A Celery protocol-2 header table with Tidegate's headers, in Celery's order."""
    return {"lang": "py", "task": "search.index", "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": args, "kwargsrepr": "{}", "origin": "gen1@host", "ignore_result": False,
            "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
            "tidegate_priority": "HIGH", "tidegate_enqueued_at": 1764700000.125}


ODD_VALUES = {"big": 2**40, "edge": -2147483647, "past_edge": -2147483648, "top": 2147483647,
              "over": 2147483648, "dec": Decimal("1.50"), "when": datetime.datetime(2026, 12, 2),
              "text": "é\ud800x", "raw": b"\x00\xff", "flag": True,
              "nested": {"a": [1, {"b": None}], "c": (2.5, "d")}}


def _message(body, headers, **properties) -> amqp.Message:
    return amqp.Message(body, application_headers=headers, **properties)


def _same(encoder: FrameEncoder, msg: amqp.Message, route=("celery", "search", True, False),
          frame_max: int = 131072) -> bytes | None:
    theirs = reference_frames(copy.deepcopy(msg), encoder.channel_id, *route, frame_max)
    mine = encoder.frames(msg, *route, frame_max)
    if mine is not None:
        assert mine == theirs
    return mine


def test_frames_are_py_amqps_for_a_batch_of_templated_messages():
    encoder = FrameEncoder(1)
    template = _headers("t0", "['d0']")
    for i in range(50):  # the template's values are the same objects job after job
        headers = template.copy()
        headers.update(id=f"t{i}", root_id=f"t{i}", argsrepr=f"['d{i}']",
                       tidegate_enqueued_at=1764700000.125 + i)
        msg = _message(f'[["d{i}"], {{}}, {{}}]'.encode(), headers, priority=i % 10,
                       content_type="application/json", content_encoding="utf-8",
                       correlation_id=f"t{i}", reply_to="", delivery_mode=2)
        assert _same(encoder, msg) is not None


def test_frames_are_py_amqps_for_odd_values_and_properties():
    encoder = FrameEncoder(7)
    headers = {**_headers("x", "()"), **ODD_VALUES}
    cases = [
        _message("text body é", headers, content_type="text/plain"),  # str: encoded utf-8
        _message(b"", {}, correlation_id=0, timestamp=123, priority=0),  # empty body, no table
        _message(b"x", None, message_id="m", type="t", user_id="guest", app_id="a",
                 expiration="60000", cluster_id="c", reply_to="r"),
        _message(b"[]", headers, content_type="application/json", delivery_mode=1),
    ]
    for msg in cases:
        assert _same(encoder, msg, route=("", "q", False, False)) is not None
        assert _same(encoder, msg) is not None  # again: entries reused from the first time


def test_a_value_changed_between_batches_is_encoded_again():
    encoder = FrameEncoder(1)
    headers = _headers("t", "[]")
    msg = _message(b"{}", headers)
    assert _same(encoder, msg) is not None
    headers["timelimit"][0] = 30  # the same list object, changed
    encoder.reset()
    assert _same(encoder, _message(b"{}", headers)) is not None


def test_a_body_py_amqp_splits_is_left_to_py_amqp():
    encoder = FrameEncoder(1)
    msg = _message(b"x" * 5000, _headers("t", "[]"))
    assert encoder.frames(msg, "", "q", False, False, 4096) is None
    assert _same(encoder, msg, frame_max=131072) is not None
