"""The retraining loop after a challenger is published: gate it against the champion, run it in
shadow on live traffic, promote it or roll back, and report on every version.

- :mod:`.stats`: McNemar's paired test (exact and mid-p).
- :mod:`.gate`: champion and challenger on the same golden texts; the verdict, recorded per version
  (the rule itself: :mod:`appliance.factory.gate_rule`, stated in the model card).
- :mod:`.sources`: the golden set, the recent corrected traffic, a published version as a predictor.
- :mod:`.choices`: the durable shadow choice and the history of serving choices.
- :mod:`.shadow`: the challenger answering a share of live traffic off the hot path; its rows.
- :mod:`.follow`: the runtime's watcher of the serving and shadow choices (every replica follows).
- :mod:`.promotion`: promote (through the gate and LoadModel) and roll back; the loop's policy.
- :mod:`.report`: per-version figures for ``appliance report NAME``.
- :mod:`.commands`: ``appliance gate|shadow|promote|rollback``.
"""
