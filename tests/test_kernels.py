"""The fast linear-layer methods chosen at load (knnssd/engine/kernels.py): chosen per shape, switchable, restorable, and
numerically safe for greedy decoding.

Plain decoding computes each token with a 1-token pass (F.linear, as transformers does); a verify pass computes
the same position as row 0 of a k-token pass with the chosen kernel. Different kernels round differently, so
where the top two logits are nearly tied the argmax could flip. `flip_report` finds every such flip with its
logit gap; the tests require that a flip happens only at a numerical near-tie, and print what they found.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from knnssd.engine.kernels import (MAX_FAST_ROWS, accelerate, compiled_kernel, mkl_packed_available, pack, restore,
                            runner, transformers_kernels)
from knnssd.engine.kvcache import new_cache, rollback
from tests.conftest import FAMILIES, tiny_model

NEAR_TIE = 1e-3  # logits closer than this may round either way in fp32 over these sums


def patched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" in vars(m)]


def test_methods_by_row_count_and_restore_undoes_them():
    model = tiny_model("llama", fast_kernels=False)
    assert not patched(model)
    plan = accelerate(model)
    assert plan.enabled and plan.threads == torch.get_num_threads() and len(plan.rows) == MAX_FAST_ROWS
    assert plan.method(MAX_FAST_ROWS + 1) == "linear"  # prefills
    assert plan.method(1) == ("rows" if compiled_kernel() else "linear")  # plain steps: the verify passes' kernel
    assert plan.method(8) == ("rows" if compiled_kernel() else "packed8" if mkl_packed_available() else "transposed")
    assert plan.batch_invariant == (compiled_kernel() is not None)
    assert len(patched(model)) == sum(isinstance(m, nn.Linear) for m in model.modules())
    print(plan.describe())
    library = accelerate(model, compiled=False)  # the plan where the C++ kernel cannot be built
    assert library.method(1) == library.method(2) == "linear" and library.method(12) == "transposed"
    assert library.method(MAX_FAST_ROWS) == "linear" and not library.batch_invariant
    assert library.method(8) == ("packed8" if mkl_packed_available() else "transposed")
    assert ("packed weights" in library.describe()) == (library.packed_bytes > 0) == mkl_packed_available()
    restore(model)
    assert not patched(model)
    assert not accelerate(model, enabled=False).enabled and not patched(model)
    capped = accelerate(model, max_packed_bytes=0, compiled=False)  # no room for packed copies: transposed
    assert capped.packed_bytes == 0 and "packed8" not in capped.rows


@pytest.mark.parametrize("rows", range(1, MAX_FAST_ROWS + 1))
def test_every_method_computes_the_product(rows):
    weight = torch.randn(43, 24, generator=torch.Generator().manual_seed(rows))  # 43 rows: the kernel's blocks
    # of 4 and 2 weight rows leave a remainder; 24 columns: one full 16-float chunk and a masked tail of 8
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(100 + rows))
    expected = x @ weight.T
    methods = ("linear", "transposed") + (("packed8",) if mkl_packed_available() and rows <= 8 else ()) + \
        (("rows",) if compiled_kernel() else ())
    for method in methods:
        packed = pack(weight) if method == "packed8" else None
        assert torch.allclose(runner(method, weight, packed)(x), expected, atol=1e-5), method


def test_the_switch_and_transformers_kernels_context(tmp_path):
    from knnssd.engine.models import load_model
    from tests.test_models import save_tiny

    save_tiny(tmp_path / "m")
    off = load_model(str(tmp_path / "m"), device="cpu", fast_kernels=False)
    assert not off.kernels.enabled and "switched off" in off.kernels.describe() and not patched(off.model)
    on = load_model(str(tmp_path / "m"), device="cpu")
    assert on.kernels.enabled
    before = patched(on.model)
    with transformers_kernels(on.model):
        assert not patched(on.model)
    assert patched(on.model) == before


@torch.inference_mode()
def flip_report(model: nn.Module, prompt: torch.Tensor, steps: int, widths=(2, 4, 8, 13)) -> tuple[int, list]:
    """Walk a greedy decode of `steps` tokens from `prompt` (1, T). At each step compare the next-token argmax of
    the 1-token pass with row 0 of verify passes of each width (random drafts). Returns (comparisons, flips),
    each flip (step, width, gap between the 1-token pass's top two logits, max |logit difference|)."""
    cache = new_cache(model)
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    token = out.logits[0, -1].argmax()
    position, flips, compared = prompt.shape[1], [], 0
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        one = model(input_ids=token.view(1, 1), position_ids=torch.tensor([[position]]), cache=cache,
                    use_cache=True).logits[0, 0]
        rollback(cache, position)
        top2 = one.topk(2).values
        for width in widths:
            drafts = torch.randint(3, one.shape[0], (width - 1,), generator=generator)
            ids = torch.cat([token.view(1), drafts]).unsqueeze(0)
            verify = model(input_ids=ids, position_ids=torch.arange(position, position + width).unsqueeze(0),
                           cache=cache, use_cache=True).logits[0, 0]
            rollback(cache, position)
            compared += 1
            if verify.argmax() != one.argmax():
                flips.append((step, width, float(top2[0] - top2[1]), float((verify - one).abs().max())))
        model(input_ids=token.view(1, 1), position_ids=torch.tensor([[position]]), cache=cache, use_cache=True)
        token, position = one.argmax(), position + 1
    return compared, flips


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rows_flip_only_at_near_ties_on_tiny_models(family):
    for seed in range(3):
        model = tiny_model(family, seed=seed)
        prompt = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(seed))
        compared, flips = flip_report(model, prompt, steps=24)
        print(f"{family} seed {seed}: {compared} verify rows compared with 1-token passes, {len(flips)} flips "
              f"{flips}")
        assert all(gap < NEAR_TIE for _, _, gap, _ in flips), flips


@pytest.mark.slow
def test_verify_rows_flip_only_at_near_ties_on_smollm2(smollm2):
    from knnssd.engine.prompts import encode_prompt
    from tests.conftest import spec_bench_rows

    first = {}
    for row in spec_bench_rows():
        first.setdefault(row["category"], row["turns"][0])
    total, all_flips = 0, []
    for category, text in sorted(first.items())[:6]:
        compared, flips = flip_report(smollm2.model, encode_prompt(smollm2.tokenizer, text, chat=True), steps=16,
                                      widths=(2, 4, 8))
        total += compared
        all_flips += [(category, *flip) for flip in flips]
    print(f"SmolLM2: {total} verify rows compared with 1-token passes, {len(all_flips)} flips: {all_flips}")
    assert all(gap < NEAR_TIE for *_, gap, _ in all_flips), all_flips


def test_fast_rows_stop_at_the_verify_limit():
    """Prefills (more than MAX_FAST_ROWS rows) keep transformers' F.linear, bit for bit."""
    fast, plain = tiny_model("qwen2", seed=5), tiny_model("qwen2", seed=5, fast_kernels=False)
    with torch.inference_mode():
        for rows in (MAX_FAST_ROWS + 1, 40):
            ids = torch.randint(3, 128, (1, rows), generator=torch.Generator().manual_seed(rows))
            assert torch.equal(fast(input_ids=ids).logits, plain(input_ids=ids).logits), rows


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_attention_computes_what_transformers_sdpa_computes(family):
    """Verify passes of 2-16 tokens (Mistral's past its sliding window) give the same logits with query heads
    grouped (knnssd/engine/attention.py) as with transformers' SDPA path, which copies the cache per head; the switch
    follows the plan, `transformers_kernels` and `restore`."""
    from knnssd.engine import attention

    model = tiny_model(family, seed=2)
    assert model.config._attn_implementation == attention.IMPLEMENTATION
    # the library plan's grouped attention, and the kernels' attention where they are built: both compute what
    # transformers' SDPA computes, up to rounding
    assert ", grouped attention 2-16" in accelerate(model, compiled=False).describe()
    assert attention.rows_kernel_of(model) is None
    prompt = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=prompt, cache=cache, use_cache=True)
        for width in (2, 3, 5, 8, 13, MAX_FAST_ROWS):
            ids = torch.randint(3, 128, (1, width), generator=torch.Generator().manual_seed(width))
            positions = torch.arange(40, 40 + width).unsqueeze(0)
            grouped = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
            rollback(cache, 40)
            with transformers_kernels(model):
                assert model.config._attn_implementation == attention.BASE_IMPLEMENTATION
                sdpa = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
            rollback(cache, 40)
            assert model.config._attn_implementation == attention.IMPLEMENTATION
            assert torch.allclose(grouped, sdpa, atol=1e-5, rtol=1e-5), (width, (grouped - sdpa).abs().max())
            if compiled_kernel() is not None:
                accelerate(model)
                assert attention.rows_kernel_of(model) is not None
                rows = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
                rollback(cache, 40)
                assert torch.allclose(rows, sdpa, atol=1e-5, rtol=1e-5), (width, (rows - sdpa).abs().max())
                accelerate(model, compiled=False)
    restore(model)
    assert model.config._attn_implementation == attention.BASE_IMPLEMENTATION
    no_groups = tiny_model(family, num_key_value_heads=4)  # one query head per key/value head: nothing to fold
    accelerate(no_groups, compiled=False)
    assert no_groups.config._attn_implementation == attention.BASE_IMPLEMENTATION


# -- issue 23: weights that change after load, a dead build's lock, the GIL -----------------------------------
@pytest.mark.parametrize("plan", ["compiled", "library"])
@pytest.mark.parametrize("assign", [False, True])
def test_a_model_loaded_again_with_load_state_dict_still_matches_transformers(plan, assign):
    """load_state_dict copies new weights in place (or, with assign=True, puts new tensors): the verify-pass
    methods must compute with them, MKL's packed copies included (they used to keep the weights of load time)."""
    if plan == "compiled" and compiled_kernel() is None:
        pytest.skip("the C++ kernel is not built on this machine")
    if plan == "library" and not mkl_packed_available():
        pytest.skip("no MKL packed GEMM in this torch")
    target = tiny_model("llama", seed=11, fast_kernels=False)
    model = tiny_model("llama", seed=12, fast_kernels=False)
    chosen = accelerate(model, compiled=plan == "compiled")
    assert chosen.method(6) == ("rows" if plan == "compiled" else "packed8")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))  # 6 rows in every linear
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    model.load_state_dict(target.state_dict(), assign=assign)
    with torch.inference_mode():
        expected, got = target(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(before, expected, atol=1e-2)  # the two models really differ
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_a_stale_build_lock_is_broken_and_a_live_one_waited_for_within_the_bound(tmp_path):
    """torch's build lock (`FileBaton`, waited for with no timeout) left by a killed build: the watchdog removes
    one older than the bound at once, and a fresh one once it reaches the bound; torch's own wait then returns."""
    import os
    import threading
    import time

    from torch.utils.file_baton import FileBaton

    from knnssd.engine.kernel_build import stale_lock_breaker

    def waits(lock, seconds):
        """Whether torch's FileBaton.wait() on `lock` returns within `seconds`."""
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (FileBaton(str(lock), wait_seconds=0.01).wait(), done.set()),
                                  daemon=True)
        waiter.start()
        return done.wait(seconds)

    stale = tmp_path / "stale-lock"
    stale.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert not waits(stale, 0.3)  # without the watchdog: torch waits (forever)
    with stale_lock_breaker(stale, stale_after=600, poll=0.05):
        assert waits(stale, 5)
    assert not stale.exists()

    fresh = tmp_path / "fresh-lock"
    fresh.touch()
    with stale_lock_breaker(fresh, stale_after=1.0, poll=0.05):
        time.sleep(0.3)
        assert fresh.exists()  # a live build's lock is left alone until the bound
        assert waits(fresh, 5)


def test_a_build_failure_without_a_message_falls_back_with_a_reason(monkeypatch):
    """An exception with an empty message used to escape the fallback as an IndexError."""
    import torch.utils.cpp_extension

    from knnssd.engine import kernel_build

    assert kernel_build.failure_reason(RuntimeError()) == "C++ kernel not built (RuntimeError)"
    assert kernel_build.failure_reason(OSError("no ninja\nmore")) == "C++ kernel not built (OSError: no ninja)"
    if not kernel_build.vector_isa():
        pytest.skip("this CPU never reaches the build (neither AVX-512 nor AVX2 with FMA)")
    monkeypatch.delenv("KNNSSD_NO_COMPILE", raising=False)
    monkeypatch.setattr(kernel_build, "_COMPILED", {})

    def failing_build(*args, **kwargs):  # a fault a real build cannot be made to produce on demand
        raise RuntimeError()

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    assert kernel_build.compiled_kernel() is None
    assert kernel_build.compile_error() == "C++ kernel not built (RuntimeError)"


def test_the_kernel_releases_the_gil_so_another_thread_runs_during_the_product():
    """Another Python thread woken just before one rows_gemm call runs in the first half of the call. With the
    GIL held for the whole call it could run only when the call returns (the old kernel: 88.0 ms into an 88.1 ms
    call)."""
    import threading
    import time

    if compiled_kernel() is None:
        pytest.skip("the C++ kernel is not built on this machine")
    kernel = compiled_kernel().rows_gemm
    weight = torch.randn(8192, 4096)  # 128 MB: one call takes tens of milliseconds
    x = torch.randn(MAX_FAST_ROWS, 4096)
    kernel(x, weight)  # warm
    for attempt in range(3):  # a loaded machine may schedule the woken thread late; once in three is proof
        go, ran_at = threading.Event(), []
        other = threading.Thread(target=lambda: (go.wait(), ran_at.append(time.perf_counter())))
        other.start()
        time.sleep(0.05)  # the other thread now waits on the event
        go.set()
        started = time.perf_counter()
        kernel(x, weight)
        finished = time.perf_counter()
        other.join()
        print(f"attempt {attempt}: call {1e3 * (finished - started):.1f} ms, other thread ran "
              f"{1e3 * (ran_at[0] - started):.1f} ms after the call started")
        if ran_at[0] < started + (finished - started) / 2:  # not merely at the GIL hand-over when the call returns
            return
    pytest.fail("the other thread never ran while the kernel computed: the GIL is held")


def test_the_kernel_refuses_tensors_not_on_the_cpu():
    if compiled_kernel() is None:
        pytest.skip("the C++ kernel is not built on this machine")
    kernel = compiled_kernel().rows_gemm
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        kernel(torch.ones(2, 4, device="meta"), torch.ones(3, 4))


@pytest.mark.slow
def test_a_kernel_load_after_a_killed_build_does_not_hang(tmp_path):
    """A fresh cache and the lock of a build that is killed while a load waits for it (a lock that stays; the
    bound set to 5 s here): the watchdog removes it and that load falls back to the library methods, saying why;
    the next load finds no lock and builds (a real build, about 40 s). An old lock found at the start is removed
    at once (test_a_stale_build_lock_is_broken_and_a_live_one_waited_for_within_the_bound)."""
    import os
    import subprocess
    import sys

    from knnssd.engine.kernel_build import vector_isa

    if not vector_isa():
        pytest.skip("this CPU never reaches the build (neither AVX-512 nor AVX2 with FMA)")
    plant = ("from knnssd.engine import kernel_build\n"
             "kernel_build.STALE_LOCK_S = 5.0\n"
             "build = kernel_build.kernel_build_dir(); build.mkdir(parents=True); (build / 'lock').touch()\n")
    load = ("from knnssd.engine.kernels import compiled_kernel, compile_error\n"
            "print('built' if compiled_kernel() is not None else 'fallback: ' + compile_error())\n")
    env = {**os.environ, "KNNSSD_CACHE": str(tmp_path / "cache")}
    env.pop("KNNSSD_NO_COMPILE", None)
    outcomes = []
    for script in (plant + load, load):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        outcomes.append((done.stdout.strip(), done.stderr))
    (first, first_log), (second, _) = outcomes
    assert first == "fallback: C++ kernel not built (RuntimeError: the build this load waited for died; the next " \
                    "load builds the kernel)", first + first_log
    assert "removed the kernel build lock" in first_log
    assert second == "built"
