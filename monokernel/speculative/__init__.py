"""Speculative decoding: several tokens a forward pass where cheap drafts agree with the target model,
never changing what decoding outputs (greedy: the same tokens; sampled: the same distribution). ngram.py and
draft_model.py propose drafts (prompt lookup, a small model of the same tokenizer); verify.py runs the verify
passes; greedy.py, sampling.py and coupled.py are the acceptance rules (the target's argmax, the standard
speculative-sampling rule, the megakernel's own draws); run.py puts them inside the Engine."""
from .coupled import coupled_accept
from .greedy import accepted_prefix, greedy_accept, speculative_greedy
from .ngram import propose
from .sampling import sampled_accept, speculative_sampling
from .verify import SpeculativeStats, speculative_decode

__all__ = ["SpeculativeStats", "accepted_prefix", "coupled_accept", "greedy_accept", "propose", "sampled_accept",
           "speculative_decode", "speculative_greedy", "speculative_sampling"]
