"""The mix study (Self-SD(Mix)): one search over every domain's calibration prompts together, kept in the bundle
as reference policy "mix" and compared with the routed policies in evaluation."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pyarrow as pa

from pipeline.data import CALIBRATION, domains_of, prompts_of
from pipeline.space import SearchConfig

MIX = "mix"  # the study over all domains' prompts together, kept in the bundle as reference policy "mix"


def mixed_prompts(table: pa.Table) -> list[str]:
    """Every domain's calibration prompts interleaved round-robin, so that any first n mix the domains."""
    per_domain = [prompts_of(table, domain, CALIBRATION) for domain in domains_of(table)]
    return [p for row in itertools.zip_longest(*per_domain) for p in row if p is not None]


def mix_search(search: SearchConfig, domains: int) -> SearchConfig:
    """The mix study's settings: its trials (and its confirmation) decode the same number of prompts from every
    domain (at least one each; the first prompts of the round-robin list), so no domain goes unseen in the
    Self-SD(Mix) baseline."""
    def per_domain(count: int) -> int:
        return -(-count // domains) * domains  # ceil to a multiple of the domains

    return replace(search, prompts_per_trial=per_domain(search.prompts_per_trial),
                   confirm_prompts=per_domain(search.confirm_prompts))
