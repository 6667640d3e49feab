import json

import pytest

from knnssd.errors import KnnSsdError
from knnssd.engine.skipset import SkipSet


def test_json_round_trip_sorts_and_dedupes():
    s = SkipSet.from_json('{"attn": [5, 1, 5], "mlp": [3]}')
    assert s.attn == (1, 5) and s.mlp == (3,)
    assert SkipSet.from_json(s.to_json()) == s
    assert json.loads(s.to_json()) == {"attn": [1, 5], "mlp": [3]}


def test_skip_ratio_counts_both_kinds():
    assert SkipSet.of(attn=[0, 1], mlp=[2]).skip_ratio(num_layers=6) == pytest.approx(3 / 12)
    assert SkipSet().skip_ratio(num_layers=6) == 0.0


def test_parse_reads_files(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"mlp": [2]}')
    assert SkipSet.parse(str(path)) == SkipSet.of(mlp=[2])


@pytest.mark.parametrize("text, words", [
    ('{"attn": [1', "not valid JSON"),
    ('{"attn": [1], "layers": [2]}', "unknown skip-set keys"),
    ('{"attn": 3}', "must be a list"),
    ('{"attn": [-1]}', "negative layer index"),
    ('{"attn": ["a"]}', "not a layer index"),
    ('[1, 2]', "must be a JSON object"),
])
def test_malformed_json_is_a_clear_error(text, words):
    with pytest.raises(KnnSsdError, match=words):
        SkipSet.from_json(text)


def test_missing_file_is_a_clear_error():
    with pytest.raises(KnnSsdError, match="neither inline JSON nor an existing file"):
        SkipSet.parse("no/such/file.json")


def test_validate_against_layer_count():
    SkipSet.of(attn=[3], mlp=[0]).validate(4)
    with pytest.raises(KnnSsdError, match="has 4 layers"):
        SkipSet.of(attn=[4]).validate(4)
    with pytest.raises(KnnSsdError, match="skips every attention and MLP"):
        SkipSet.of(attn=range(4), mlp=range(4)).validate(4)
