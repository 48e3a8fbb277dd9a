"""The retraining loop after a challenger is published: gate it against the champion, run it in
shadow on live traffic, promote it or roll back, and report on every version.

- :mod:`.stats`: McNemar's paired test (exact and mid-p).
- :mod:`.gate`: champion and challenger on the same golden texts; the verdict, recorded per version.
- :mod:`.choices`: the durable shadow choice the runtime follows, and the history of serving choices.
- :mod:`.shadow`: the challenger answering a share of live traffic off the hot path; its rows.
- :mod:`.follow`: the runtime's watcher of the serving and shadow choices (every replica follows).
- :mod:`.commands`: ``appliance gate|shadow|promote|rollback``.
"""
