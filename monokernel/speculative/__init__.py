"""Speculative decoding: several tokens a forward pass where cheap drafts agree with the target model,
never changing what decoding outputs (greedy: the same tokens; sampled: the same distribution). ngram.py and
draft_model.py propose drafts (prompt lookup, a small model of the same tokenizer); verify.py runs the verify
passes; greedy.py and sampling.py are the two acceptance rules; run.py puts them inside the Engine."""
from .greedy import accepted_prefix, greedy_accept, speculative_greedy
from .ngram import propose
from .sampling import sampled_accept, speculative_sampling
from .verify import SpeculativeStats, speculative_decode

__all__ = ["SpeculativeStats", "accepted_prefix", "greedy_accept", "propose", "sampled_accept",
           "speculative_decode", "speculative_greedy", "speculative_sampling"]
