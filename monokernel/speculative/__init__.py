"""Speculative decoding: several tokens a forward pass where cheap drafts agree with the target model,
never changing what greedy decoding outputs. ngram.py proposes drafts by prompt lookup; greedy.py verifies
them and keeps the longest prefix the target confirms."""
from .greedy import SpeculativeStats, accepted_prefix, speculative_greedy
from .ngram import propose

__all__ = ["SpeculativeStats", "accepted_prefix", "propose", "speculative_greedy"]
