"""`python -m mmjax.bench.decode` in a tiny configuration: both ways decode the same tokens, figures and JSON."""

import json

from mmjax.bench import decode as bench


def test_decode_bench_prints_tokens_per_second_with_and_without_cache(tmp_path, capsys):
    out = tmp_path / "decode.json"
    results = bench.main(["--batch", "4", "--length", "12", "--width", "16", "--depth", "1", "--heads", "2",
                          "--vocab", "30", "--repeats", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert results["same_tokens"] and json.loads(out.read_text())["same_tokens"]
    for name in ("cache", "no_cache"):
        assert results[name]["tokens"] == 4 * 11 and results[name]["tokens_per_s"] > 0  # No early [EOS].
    assert "| cache |" in table and "| no cache |" in table and "key/value cache speed-up" in table
