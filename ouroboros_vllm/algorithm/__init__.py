"""The Ouroboros algorithm, in pure Python and numpy: no torch, no vLLM (a test checks it).

- :mod:`.pool`: the phrase pool shared by every request; :mod:`.pool_file`: its file format;
- :mod:`.drafting` and :mod:`.layout`: drafting phrase by phrase, as bookkeeping (what a draft forward carries,
  what it emits), with the lookahead window of :mod:`.lookahead`;
- :mod:`.proposal`: the trunk lengthened by pool suffixes; :mod:`.feedback`: inspiration and refinement;
- :mod:`.request`: one request's state and the verbs of its life; :mod:`.stats`: the counters.
"""
