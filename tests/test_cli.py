"""`knnssd generate`: JSON output, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from knnssd.cli import main
from tests.test_models import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_with_compare_ar(capsys, tiny_folder):
    code, out, _ = run(capsys, "--model", tiny_folder, "--prompt", "t5 t6 t7 t9", "--max-new-tokens", "12",
                       "--skip-set", '{"attn": [2, 3], "mlp": []}', "--threshold", "0", "--compare-ar", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["token_ids"] == report["ar_token_ids"] and report["identical_to_ar"]
    assert len(report["token_ids"]) <= 12 and isinstance(report["text"], str)
    assert report["speedup"] > 0 and report["ar_tokens_per_second"] > 0
    assert report["stats"]["drafted_tokens"] > 0
    assert report["drafter"]["skip_set"] == {"attn": [2, 3], "mlp": []}


def test_skip_set_from_file_and_sampling(capsys, tiny_folder, tmp_path):
    path = tmp_path / "skip.json"
    path.write_text('{"mlp": [1]}')
    code, out, _ = run(capsys, "--model", tiny_folder, "--prompt", "t5 t6", "--max-new-tokens", "5",
                       "--skip-set", str(path), "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--json")
    assert code == 0 and json.loads(out)["drafter"]["skip_set"] == {"attn": [], "mlp": [1]}


def test_policy_flag_runs_prompt_lookup(capsys, tiny_folder):
    code, out, _ = run(capsys, "--model", tiny_folder, "--prompt", "t5 t6 t7 t5 t6 t7 t5 t6", "--max-new-tokens", "16",
                       "--policy", '{"kind": "prompt_lookup", "max_ngram": 2, "max_draft_tokens": 4}',
                       "--compare-ar", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["drafter"] == {"kind": "prompt_lookup", "max_ngram": 2, "min_ngram": 1, "max_draft_tokens": 4}
    assert report["identical_to_ar"] and report["stats"]["draft_forwards"] == 0


@pytest.mark.parametrize("args, words", [
    (["--policy", '{"kind": "beam"}'], "unknown draft policy kind"),
    (["--policy", "{oops"], "not valid JSON"),
    (["--policy", "lookup"], "neither inline JSON nor an existing file"),
    (["--policy", '{"kind": "none"}', "--skip-set", '{"attn": [1]}'], "given together"),
    (["--skip-set", '{"attn": [7]}'], "has 4 layers"),
    (["--skip-set", '{"attn": [0,1,2,3], "mlp": [0,1,2,3]}'], "skips every attention and MLP"),
    (["--skip-set", '{"attn": [1'], "not valid JSON"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt", " ".join(["t5"] * 600)], "exceeds the model's context of 512 tokens"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--chat"], "no chat template"),
])
def test_bad_input_is_one_clear_line(capsys, tiny_folder, args, words):
    base = {"--prompt": "t5 t6", "--max-new-tokens": "4"}
    argv = ["--model", tiny_folder]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    code, out, err = run(capsys, *argv, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    assert "fix:" in err


def test_unknown_model_in_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "knnssd.cli", "generate", "--model", str(tmp_path / "missing"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist or holds no config.json" in proc.stderr and "Traceback" not in proc.stderr
