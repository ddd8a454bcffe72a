"""The draft model's runtime: loading and checking it (:mod:`.loading`), its persistent KV cache
(:mod:`.kv_cache`), the attention over that cache (:mod:`.attention`) and the one forward for any set of
requests (:mod:`.draft_runtime`). Knows torch and transformers, not vLLM."""
