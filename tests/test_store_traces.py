"""The store stage decodes with the engine's own batched plain decoding, so a store output is plain decoding's
exactly and the search traces its trials from the store: every calibration prompt in it, no decoding, the same
scores as traces decoded one prompt at a time, each prompt scored without its own output (leave-one-out)."""

from __future__ import annotations

import optuna
import pytest
import torch

from knnssd.engine.batch import can_batch
from knnssd.engine.decoding import GenerationConfig, begin, generate, prefill
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.drafters import SuccessorRecorder
from pipeline.data import DataConfig, split_table
from pipeline.scoring import Workload, build_workload, score_policy
from pipeline.search import completed_trials, make_objective, open_study, prepare_study, run_worker
from pipeline.space import SearchConfig
from pipeline.store_decoding import decode_store
from pipeline.stores import DomainStore
from pipeline.successors import model_vocab
from pipeline.tasks import search_workload
from pipeline.traces import store_traces, trace_prompt
from tests.conftest import tiny_model
from tests.test_replay import branching_prompt, costs

STORE_TOKENS = 24
SEARCH_TOKENS = 16
TREE = {"kind": "suffix_tree", "max_ngram": 3, "max_tree_nodes": 8, "max_depth": 6, "recycled_nodes": 4,
        "recycled_k": 2}


def prompts_of(count: int = 6) -> list[torch.Tensor]:
    """Prompts of different lengths; the branching ones repeat text, so suffix trees and stores draft."""
    generator = torch.Generator().manual_seed(7)
    return [branching_prompt(seed) if seed % 2 else torch.randint(3, 128, (1, 4 + 3 * seed), generator=generator)
            for seed in range(1, count + 1)]


def recorded(model, ids, tokens: int, eos: tuple[int, ...] | None = None):
    """Plain decoding of `ids` with a SuccessorRecorder: (new tokens, rows)."""
    recorder = SuccessorRecorder()
    result = generate(model, ids, GenerationConfig(max_new_tokens=tokens, eos_token_ids=eos), recorder)
    return result.token_ids, [tuple(row) for row in recorder.rows]


def check_store_is_plain_decoding(model, prompts, decoded, tokens: int = STORE_TOKENS) -> None:
    for ids, output, rows in zip(prompts, decoded.outputs, decoded.successors):
        plain, plain_rows = recorded(model, ids, tokens)
        assert output == plain
        assert len(rows) == len(output) and list(rows[:-1]) == plain_rows
        # the last row: what the loop computes after the last token, one step on, EOS or not
        _, on = recorded(model, ids, len(output) + 1, eos=())
        assert rows[-1] == on[len(output) - 1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_store_outputs_are_plain_decoding_token_for_token_with_the_loops_successor_rows(family):
    model = tiny_model(family)
    prompts = prompts_of()
    assert can_batch(model, [begin(model, prompts[0], GenerationConfig(max_new_tokens=4)).state.cache], 4)
    decoded = decode_store(model, prompts, STORE_TOKENS, batch_size=4, batch_invariant=True)
    assert decoded.batched and [len(o) for o in decoded.outputs] == [STORE_TOKENS] * len(prompts)
    check_store_is_plain_decoding(model, prompts, decoded)
    # each prompt's embedding, the runtime's (what `pipeline.tasks.embed_prompts` computes): bit for bit
    for ids, embedding in zip(prompts, decoded.embeddings):
        alone = prefill(model, ids.reshape(1, -1), SamplingConfig(), None, lambda: 0.0).embedding
        assert torch.equal(torch.from_numpy(embedding), alone)
    assert decoded.embeddings.shape == (len(prompts), model.config.hidden_size)


def test_an_eos_ends_a_store_output_as_it_ends_plain_decoding_and_still_gets_its_row():
    model = tiny_model("llama")
    prompts = prompts_of()
    free = decode_store(model, prompts, STORE_TOKENS, batch_size=3, batch_invariant=True)
    eos = free.outputs[1][5]  # a token the model produces: now its EOS
    model.generation_config.eos_token_id = eos
    decoded = decode_store(model, prompts, STORE_TOKENS, batch_size=3, batch_invariant=True)
    assert len(decoded.outputs[1]) <= 6 and decoded.outputs[1][-1] == eos
    check_store_is_plain_decoding(model, prompts, decoded)
    # traces from it equal trace_prompt's, an EOS-ended output included
    for ids, trace in zip(prompts, store_traces(model, prompts, decoded.outputs, decoded.successors, SEARCH_TOKENS)):
        plain = trace_prompt(model, ids, SEARCH_TOKENS)
        assert trace is not None and (trace.tokens, trace.successors) == (plain.tokens, plain.successors)


def test_without_batch_invariance_or_batching_the_store_is_still_plain_decoding():
    mistral = tiny_model("mistral")  # its sliding window: every request gets its own verify pass
    prompts = prompts_of(4)
    assert not can_batch(mistral, [begin(mistral, prompts[0], GenerationConfig(max_new_tokens=4)).state.cache], 4)
    decoded = decode_store(mistral, prompts, STORE_TOKENS, batch_size=4, batch_invariant=True)
    check_store_is_plain_decoding(mistral, prompts, decoded)
    traces = store_traces(mistral, prompts, decoded.outputs, decoded.successors, SEARCH_TOKENS)
    assert [(t.tokens, t.successors) for t in traces] == [
        (p.tokens, p.successors) for p in (trace_prompt(mistral, ids, SEARCH_TOKENS) for ids in prompts)]
    library = tiny_model("llama", fast_kernels=False)  # library products: each generation stepped alone
    alone = decode_store(library, prompts, STORE_TOKENS, batch_size=4, batch_invariant=False)
    assert not alone.batched
    check_store_is_plain_decoding(library, prompts, alone)


def test_store_traces_equal_trace_prompts_and_are_untimed():
    model = tiny_model("llama")
    prompts = prompts_of()
    decoded = decode_store(model, prompts, STORE_TOKENS, batch_size=8, batch_invariant=True)
    traces = store_traces(model, prompts, decoded.outputs, decoded.successors, SEARCH_TOKENS)
    for ids, trace in zip(prompts, traces):
        plain = trace_prompt(model, ids, SEARCH_TOKENS)
        assert (trace.prompt, trace.tokens, trace.successors, trace.max_new_tokens) == (
            plain.prompt, plain.tokens, plain.successors, plain.max_new_tokens)
        assert not trace.timed and trace.seconds == trace.prefill_seconds == 0.0 and plain.timed
    # a store without rows (a corpus joined to it): the rows come from one untimed plain run per prompt
    bare = store_traces(model, prompts, decoded.outputs, None, SEARCH_TOKENS)
    assert [t.successors for t in bare] == [t.successors for t in traces]
    # a store budget below the search's, no EOS: the store cannot tell, so no trace
    assert store_traces(model, prompts[:1], [decoded.outputs[0][:8]], None, SEARCH_TOKENS) == [None]


def domain_store(model, prompts, texts, tokens: int = STORE_TOKENS) -> DomainStore:
    decoded = decode_store(model, prompts, tokens, batch_size=4, batch_invariant=True)
    return DomainStore(domain="d", prompts=tuple(texts), outputs=decoded.outputs, successors=decoded.successors,
                       vocab=model_vocab(model))


def test_a_search_scores_every_stored_prompt_exactly_as_decoded_traces_and_leaves_each_ones_output_out(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = tiny_model("llama")
    prompts = prompts_of(6)
    texts = [f"prompt {i}" for i in range(len(prompts))]
    encode = dict(zip(texts, prompts)).__getitem__
    store = domain_store(model, prompts, texts)
    config = SearchConfig(trials=6, prompts_per_trial=16, confirm_prompts=16, max_new_tokens=SEARCH_TOKENS,
                          kinds=("suffix_tree",), sampler="random")
    said = []
    workload = search_workload(model, encode, texts, config, store, said.append)
    assert workload.texts == tuple(texts) and "6 calibration prompts, 6 traced from the store" in said[-1]
    decoded = build_workload(model, prompts, SEARCH_TOKENS, texts)
    assert [(t.tokens, t.successors) for t in workload.traces] == [(t.tokens, t.successors) for t in decoded.traces]
    table = costs()
    storage = str(tmp_path / "journal.log")
    prepare_study(storage, "all", num_layers=4, config=config, has_store=True)
    study = open_study(storage, "all", config)
    run_worker(study, make_objective(model, 4, workload, table, config, lambda message: None, store), config)
    trials = completed_trials(study)
    assert len(trials) == config.trials and {t.user_attrs["prompts"] for t in trials} == {len(prompts)}
    for trial in trials:
        policy = trial.user_attrs["policy"]
        assert trial.value == score_policy(model, policy, 4, decoded, table, store).predicted_speedup
    # leave-one-out: a prompt drafting from the whole store (its own output in it) would score far higher
    stored = {**TREE, "use_store": True}
    own = Workload(traces=workload.traces, caches=workload.caches,  # a text not in it: the whole store
                   texts=("a held-out prompt",) * len(texts))
    left_out = score_policy(model, stored, 4, workload, table, store)
    assert left_out.predicted_speedup < score_policy(model, stored, 4, own, table, store).predicted_speedup
    assert left_out == score_policy(model, stored, 4, decoded, table, store)


def test_fewer_prompts_than_prompts_per_trial_use_what_there_is():
    model = tiny_model("llama")
    prompts = prompts_of(3)
    texts = ["a", "b", "c"]
    store = domain_store(model, prompts, texts, tokens=8)  # below the search's budget: those are decoded
    config = SearchConfig(prompts_per_trial=16, confirm_prompts=16, max_new_tokens=SEARCH_TOKENS)
    said = []
    workload = search_workload(model, dict(zip(texts, prompts)).__getitem__, texts, config, store, said.append)
    assert len(workload.traces) == 3 and any("decoding those prompts" in line for line in said)
    assert [t.tokens for t in workload.traces] == [trace_prompt(model, ids, SEARCH_TOKENS).tokens for ids in prompts]
    # the split asks for one calibration prompt per domain, whatever --prompts-per-trial says
    rows = [("x", "one"), ("x", "two"), ("y", "three"), ("y", "four"), ("y", "five")]
    table = split_table(rows, DataConfig(held_out_fraction=0.5))
    assert sorted(table["split"].to_pylist()).count("calibration") == 2


def test_a_prompt_near_the_context_stores_what_fits_with_its_rows():
    """A prompt 4 positions short of the model's context: plain decoding fits 4 new tokens, the store keeps the 3
    whose rows it computed (the 4th token's row would need a 5th position), equal to plain decoding's first 3; a
    short prompt beside it in the same batch keeps its whole budget."""
    model = tiny_model("llama", max_position_embeddings=64)
    generator = torch.Generator().manual_seed(3)
    near = torch.randint(3, 128, (1, 60), generator=generator)
    short = torch.randint(3, 128, (1, 10), generator=generator)
    decoded = decode_store(model, [near, short], 8, 2, True)
    plain_near = generate(model, near, GenerationConfig(max_new_tokens=4, eos_token_ids=())).token_ids
    plain_short = generate(model, short, GenerationConfig(max_new_tokens=8, eos_token_ids=())).token_ids
    assert decoded.outputs[0] == tuple(plain_near[:3]) and len(decoded.successors[0]) == 3
    assert decoded.outputs[1] == tuple(plain_short[:len(decoded.outputs[1])])
    assert len(decoded.outputs[1]) == 8 or decoded.outputs[1][-1] == 2
