"""Drafters: the interface (`base`) and one module per drafter kind.

    layer_skip      LayerSkipDrafter, LayerSkipConfig: the target model with sub-layers skipped
    prompt_lookup   PromptLookupDrafter, PromptLookupConfig: n-gram lookup in prompt + output
    hybrid          HybridDrafter: lookup where the text repeats, layer skipping elsewhere
    suffix_tree     SuffixTreeDrafter, SuffixTreeConfig: a token tree of the continuations of the latest suffix
    recycled        SuccessorTable, SuccessorRecorder: the model's own top-k successors per token (Token Recycling),
                    a source of the suffix tree's
"""

from knnssd.engine.drafters.base import Draft, Drafter, DraftRequest, DraftSession
from knnssd.engine.drafters.hybrid import HybridDrafter, HybridSession
from knnssd.engine.drafters.layer_skip import LayerSkipConfig, LayerSkipDrafter, LayerSkipSession
from knnssd.engine.drafters.prompt_lookup import NgramIndex, PromptLookupConfig, PromptLookupDrafter, PromptLookupSession
from knnssd.engine.drafters.recycled import MAX_SUCCESSORS, SuccessorRecorder, SuccessorTable, top_successors
from knnssd.engine.drafters.suffix_tree import (OccurrenceIndex, StoreIndex, SuffixStore, SuffixTreeConfig,
                                                SuffixTreeDrafter, SuffixTreeSession)

__all__ = ["Draft", "DraftRequest", "DraftSession", "Drafter", "HybridDrafter", "HybridSession", "LayerSkipConfig",
           "LayerSkipDrafter", "LayerSkipSession", "MAX_SUCCESSORS", "NgramIndex", "OccurrenceIndex",
           "PromptLookupConfig", "PromptLookupDrafter", "PromptLookupSession", "StoreIndex", "SuccessorRecorder",
           "SuccessorTable", "SuffixStore", "SuffixTreeConfig", "SuffixTreeDrafter", "SuffixTreeSession",
           "top_successors"]
