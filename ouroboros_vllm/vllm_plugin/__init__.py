"""The only part of the package that knows vLLM: the plugin entry point (:mod:`.entry`), the runner hooks
(:mod:`.hooks`), the ``custom_class`` proposer (:mod:`.proposer`), the settings (:mod:`.config`) and the
Prometheus metrics (:mod:`.metrics`)."""
