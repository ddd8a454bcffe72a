"""What a person runs: the ``ouroboros-vllm`` command (:mod:`.cli`), the demo, model fetching
(:mod:`.models`), the server launcher (:mod:`.serve`) and the offline ``LLM()`` helpers (:mod:`.offline`).
Nothing else in the package imports it."""
