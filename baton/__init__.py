"""Baton: disaggregated prefill/decode LLM serving.

`baton.LLM` and `baton.SamplingParams` are the offline API. The torch-backed names load on
first use, so torch-free users of this package (the gateway) stay light.
"""

from baton.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from baton.llm import LLM

        return LLM
    raise AttributeError(name)
