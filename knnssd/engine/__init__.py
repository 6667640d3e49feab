"""The engine: decoding with lossless verification, and everything a decoding step touches.

    decoding.py     the one decoding loop: prefill, draft, verify, accept, roll back (`generate`, `decode`)
    tree.py         token trees: flattening, the tree attention mask, acceptance along the tree
    kvcache.py      the preallocated KV cache and its rollback
    attention.py    attention for verify passes (the causal and tree masks)
    kernels.py      the small-batch products of verify passes (C++ in csrc/, built by kernel_build.py)
    sampling.py     sampling settings and the rejection-sampling rule that keeps sampled output lossless
    sublayers.py    skipping attention and MLP sub-layers for layer-skip drafting (a context manager)
    skipset.py      `SkipSet`: which sub-layers a layer-skip draft skips
    drafters/       one module per drafter kind (layer skip, prompt lookup, hybrid, suffix trees)
    policy.py       a draft policy (JSON) to its drafter
    models.py       loading a model (a Hugging Face id, a local folder or the built-in GGUF)
    modelhash.py    the hash that ties a bundle to its model
    prompts.py      prompts to token ids (the chat template)
    stats.py        `GenerationStats`: what a generation drafted, accepted and cost
    threads.py      torch's thread count
    checks.py, jsonarg.py   checking config values and JSON arguments
"""
