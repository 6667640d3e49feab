"""A sweep of bad inputs through every entry a user types: `knnssd generate`, `knnssd bundles`,
`jobs/calibrate.py`, `jobs/evaluate.py`. Each must give exit code 2, exactly one line `error: ... (fix: ...)`,
no traceback, and no cluster work (no Ray started, no Optuna journal written) where the input can be checked
before it. The entries run in this process (as `main(argv)`); tests/test_cli.py and test_calibrate_job.py run
some of the same through real subprocesses."""

from __future__ import annotations

import json

import pytest

from knnssd.cli import main as knnssd_main
from jobs.calibrate import main as calibrate_main
from jobs.evaluate import main as evaluate_main
from tests.services import free_port
from tests.test_models import save_tiny

SKIP_JSON = {"attn": [0, 1, 2, 3], "mlp": [0, 1, 2, 3]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a good data file and some broken ones, an empty folder, a folder that is no model."""
    root = tmp_path_factory.mktemp("bad-input")
    save_tiny(root / "model")
    rows = [{"domain": d, "prompt": " ".join(f"t{base + (i + j) % 20}" for j in range(10))}
            for d, base in (("low", 3), ("high", 100)) for i in range(8)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    (root / "empty-folder").mkdir()
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("hello")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(root / "gpt2")
    signed_bundles(root)
    return root


def signed_bundles(root):
    """Key pairs `trusted` and `other`; bundles: `unsigned`, `foreign` (signed by the other key), `tampered`
    (signed by the trusted key, then a file changed)."""
    import shutil

    from knnssd.engine.models import load_model
    from knnssd.bundle.signing import generate_key_pair, sign_bundle
    from tests.bundles import tiny_bundle

    generate_key_pair(root / "trusted")
    generate_key_pair(root / "other")
    tiny_bundle(load_model(str(root / "model"), device="cpu"), root / "unsigned")
    sign_bundle(shutil.copytree(root / "unsigned", root / "foreign"), root / "other.key")
    sign_bundle(shutil.copytree(root / "unsigned", root / "tampered"), root / "trusted.key")
    (root / "tampered" / "anchors.json").write_text('{"dim": 64, "labels": []}')


def trusted(f, bundle):
    return ["bundles", "show", str(f / bundle), "--trusted-key", str(f / "trusted.pub")]


def generate_args(files, *extra):
    return ["generate", "--model", str(files / "model"), "--prompt", "t5 t6 t7", "--max-new-tokens", "4", *extra]


def calibrate_args(files, *extra):
    args = ["--model", str(files / "model"), "--data", str(files / "data.jsonl"), "--no-chat", "--work-dir",
            str(files / "work"), "--prompts-per-trial", "2", "--max-new-tokens", "4", "--trials", "2",
            "--tracking-uri", f"sqlite:///{files}/mlflow.db", "--no-final-demo"]
    for flag, value in zip(extra[::2], extra[1::2]):  # later flags replace earlier ones
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


CASES = [
    # knnssd generate: models
    ("generate", lambda f: generate_args(f, "--model", "/nonexistent/model"), "does not exist"),
    ("generate", lambda f: generate_args(f, "--model", str(f / "not-a-model")), "holds no config.json"),
    ("generate", lambda f: generate_args(f, "--model", str(f / "gpt2")), "'gpt2' model"),
    # skip sets
    ("generate", lambda f: generate_args(f, "--skip-set", '{"attn": [7]}'), "has 4 layers"),
    ("generate", lambda f: generate_args(f, "--skip-set", '{"attn": [-1]}'), "negative layer index"),
    ("generate", lambda f: generate_args(f, "--skip-set", '{"attn": [1.5]}'), "not a layer index"),
    ("generate", lambda f: generate_args(f, "--skip-set", json.dumps(SKIP_JSON)), "skips every attention"),
    ("generate", lambda f: generate_args(f, "--skip-set", '{"attn": [1'), "not valid JSON"),
    # prompts and lengths
    ("generate", lambda f: generate_args(f, "--prompt", "   "), "the prompt is empty"),
    ("generate", lambda f: generate_args(f, "--prompt", " ".join(["t5"] * 600)), "exceeds the model's context"),
    ("generate", lambda f: generate_args(f, "--max-new-tokens", "0"), "max_new_tokens must be an integer >= 1"),
    ("generate", lambda f: generate_args(f, "--max-new-tokens", "-3"), "max_new_tokens must be an integer >= 1"),
    # sampling
    ("generate", lambda f: generate_args(f, "--temperature", "-1"), "temperature must be >= 0"),
    ("generate", lambda f: generate_args(f, "--top-p", "0"), "top_p must be in (0, 1]"),
    ("generate", lambda f: generate_args(f, "--top-p", "1.5"), "top_p must be in (0, 1]"),
    ("generate", lambda f: generate_args(f, "--top-k", "-1"), "top_k must be >= 0"),
    ("generate", lambda f: generate_args(f, "--top-k", "2.5"), "invalid int value"),
    # policies: unknown kind, mistyped and misspelt fields
    ("generate", lambda f: generate_args(f, "--policy", '{"kind": "beam"}'), "unknown draft policy kind"),
    ("generate", lambda f: generate_args(f, "--policy", '{"kind": "prompt_lookup", "max_ngram": 2.5}'),
     "max_ngram must be an integer"),
    ("generate", lambda f: generate_args(
        f, "--policy", '{"kind": "layer_skip", "skip_set": {"attn": [1]}, "threshold": "0.8"}'),
     "threshold must be a number"),
    ("generate", lambda f: generate_args(
        f, "--policy", '{"kind": "layer_skip", "skip_set": {"attn": [1]}, "adaptive": "false"}'),
     "adaptive must be true or false"),
    ("generate", lambda f: generate_args(
        f, "--policy", '{"kind": "layer_skip", "skip_set": {"attn": [1]}, "keep_unconfident": "false"}'),
     "keep_unconfident must be true or false"),
    ("generate", lambda f: generate_args(f, "--policy", '{"kind": "prompt_lookup", "max_ngrams": 3}'),
     "unknown fields ['max_ngrams']"),
    # bundles
    ("generate", lambda f: generate_args(f, "--bundle", "no/such/bundle"), "does not exist"),
    ("generate", lambda f: ["bundles", "show", "bad name!"], "malformed bundle reference"),
    ("generate", lambda f: ["bundles", "show", str(f / "empty-folder")], "not a routing bundle"),
    ("generate", lambda f: ["bundles", "show", "name@v1", "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
     "did not answer"),
    ("generate", lambda f: ["bundles", "list", "nobody", "--tracking-uri", f"sqlite:///{f}/empty-store.db"],
     "no bundle named 'nobody'"),
    # jobs/calibrate.py
    # signatures and trust (knnssd/bundle/signing.py)
    ("generate", lambda f: trusted(f, "unsigned"), "is unsigned, and trusted keys are configured"),
    ("generate", lambda f: trusted(f, "foreign"), "signed by a key that is not among the trusted ones"),
    ("generate", lambda f: trusted(f, "tampered"), "files differ from the ones its signature covers"),
    ("generate", lambda f: ["bundles", "compare", str(f / "unsigned"), str(f / "foreign"), "--trusted-key",
                            str(f / "other.pub")], "is unsigned"),
    ("generate", lambda f: ["bundles", "show", str(f / "unsigned"), "--trusted-key", str(f / "nope.pub")],
     "does not exist"),
    ("generate", lambda f: ["bundles", "show", str(f / "unsigned"), "--trusted-key", str(f / "trusted.key")],
     "is not a PEM public key"),
    ("generate", lambda f: generate_args(f, "--bundle", str(f / "foreign"), "--trusted-key", str(f / "trusted.pub")),
     "not among the trusted ones"),
    ("generate", lambda f: ["keys", "generate", "--out", str(f / "trusted")], "already exists"),
    ("calibrate", lambda f: calibrate_args(f, "--signing-key", str(f / "nope.key")), "does not exist"),
    ("calibrate", lambda f: calibrate_args(f, "--signing-key", str(f / "trusted.pub")),
     "is not an unencrypted PEM private key"),
    ("calibrate", lambda f: calibrate_args(f, "--held-out-fraction", "0"), "held-out fraction must be in (0, 1)"),
    ("calibrate", lambda f: calibrate_args(f, "--anchors-per-domain", "0"), "anchors per domain must be"),
    ("calibrate", lambda f: calibrate_args(f, "--anchors-per-domain", "-2"), "anchors per domain must be"),
    ("calibrate", lambda f: calibrate_args(f, "--bundle-name", "x@v3"), "names a version or alias"),
    ("calibrate", lambda f: calibrate_args(f, "--bundle-name", "bad name!"), "malformed bundle reference"),
    ("calibrate", lambda f: calibrate_args(f, "--trials", "0"), "--trials must be >= 1"),
    ("calibrate", lambda f: calibrate_args(f, "--max-new-tokens", "0"), "--max-new-tokens must be >= 2"),
    ("calibrate", lambda f: calibrate_args(f, "--data", str(f / "missing.jsonl")), "does not exist"),
    ("calibrate", lambda f: calibrate_args(f, "--data", str(f / "empty.jsonl")), "holds no prompts"),
    ("calibrate", lambda f: calibrate_args(f, "--data", str(f / "malformed.jsonl")), "line 2 is not JSON"),
    ("calibrate", lambda f: calibrate_args(f, "--columns", "domain=topic"), "has no column 'topic'"),
    ("calibrate", lambda f: calibrate_args(f, "--domains", "nope"), "not in the data"),
    ("calibrate", lambda f: calibrate_args(f, "--prompts-per-trial", "0"), "--prompts-per-trial must be >= 1"),
    ("calibrate", lambda f: calibrate_args(f, "--policies", "beam"), "unknown or no drafter kinds"),
    ("calibrate", lambda f: calibrate_args(f, "--model", str(f / "gpt2")), "'gpt2' model"),
    ("calibrate", lambda f: calibrate_args(f, "--trials", "two"), "invalid int value"),
    ("calibrate", lambda f: calibrate_args(f, "--confirm-candidates", "0"), "--confirm-candidates must be >= 1"),
    ("calibrate", lambda f: calibrate_args(f, "--confirm-prompts", "0"), "--confirm-prompts must be >= 1"),
    ("calibrate", lambda f: calibrate_args(f, "--workers-per-domain", "0"), "--workers-per-domain must be >= 1"),
    ("calibrate", lambda f: calibrate_args(f, "--validate-prompts", "0"), "--validate-prompts must be >= 1"),
    ("calibrate", lambda f: calibrate_args(f, "--threads", "2", "--search-threads", "3"),
     "--search-threads must be between 1 and the decoding threads (2)"),
    ("calibrate", lambda f: calibrate_args(f, "--kind-share", "0.5"), "--kind-share 0.5 must be in [0, 1 / 4 kinds]"),
    # jobs/evaluate.py
    ("evaluate", lambda f: ["--bundle", "no/such/bundle"], "does not exist"),
    ("evaluate", lambda f: ["--bundle", "bad name!"], "malformed bundle reference"),
    ("evaluate", lambda f: ["--bundle", str(f / "empty-folder")], "not a routing bundle"),
    ("evaluate", lambda f: ["--bundle", str(f / "unsigned"), "--trusted-key", str(f / "trusted.pub"), "--no-log"],
     "is unsigned, and trusted keys are configured"),
    ("evaluate", lambda f: ["--bundle", "x", "--prompts-per-domain", "0"], "must be >= 1"),
    ("evaluate", lambda f: ["--bundle", "x", "--streams", "sideways"], "unknown stream sideways"),
    ("evaluate", lambda f: ["--bundle", "x", "--policy", 'l={"kind": "prompt_lookup", "max_ngram": 2.5}'],
     "max_ngram must be an integer"),
]
MAINS = {"generate": knnssd_main, "calibrate": calibrate_main, "evaluate": evaluate_main}


@pytest.mark.parametrize("entry, make_args, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line_and_starts_no_work(files, capsys, entry, make_args, words):
    import ray

    try:
        code = MAINS[entry](make_args(files))
    except SystemExit as exc:  # argparse's own checks exit
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(fix: " in lines[0], err
    assert words in lines[0] and "Traceback" not in err
    assert not ray.is_initialized()
    assert not (files / "work" / "optuna-journal.log").exists()


def test_the_sweep_is_wide():
    assert len(CASES) >= 30 and set(MAINS) == {case[0] for case in CASES}
