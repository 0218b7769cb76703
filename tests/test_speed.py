"""Speed measurement: interleaved prefill and KV-cache decode timings, ratios per repeat."""

import pytest
import torch

from prunerzero.fitness.speed import Speed, compare, ratio
from prunerzero.fitness.speed import SpeedProtocol


def test_compare_times_each_model_per_repeat_and_a_smaller_model_is_not_slower(tiny_llama, tiny_windows):
    got = compare({"a": tiny_llama, "b": tiny_llama}, tiny_windows[:2, :8], repeats=3, warmup=1, decode_tokens=4)
    for s in got.values():
        assert len(s.prefill_s) == len(s.decode_s) == 3 and s.prefill_ms > 0 and s.decode_tokens_per_s > 0
        assert s.prefill_tokens_per_s == pytest.approx(2 * 8 / (s.prefill_ms / 1e3))
    assert ratio(Speed(1, 4, [1.0, 2.0, 4.0]), Speed(1, 4, [2.0, 2.0, 12.0])) == 2.0  # per repeat, then median
    with pytest.raises(ValueError, match="repeats"):
        compare({"a": tiny_llama}, tiny_windows, repeats=0)


def test_speed_protocol_fills_the_leaderboard_columns(tiny_llama, tiny_windows):
    cols = SpeedProtocol(batch=2, seq_len=8, repeats=2, decode_tokens=2).columns(tiny_llama, tiny_llama, tiny_windows)
    assert set(cols) == {"latency_ms", "dense_latency_ms", "tokens_per_s", "dense_tokens_per_s",
                         "decode_tokens_per_s", "dense_decode_tokens_per_s"} and all(v > 0 for v in cols.values())
    with pytest.raises(ValueError, match="speed needs 8 windows of 8 tokens"):
        SpeedProtocol(batch=8, seq_len=8).columns(tiny_llama, tiny_llama, tiny_windows)
