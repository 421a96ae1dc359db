"""Speech track: Speech Commands data, a synthetic keyword generator, features, GRU models.

``speech.frontier`` is the track's frontier protocol (methods, budgets and splits of a sweep,
SVD baselines, paired gaps); ``speech.report`` adds it to ``python -m strlowrank.report``.
"""

# the module `python -m strlowrank.sweep --track speech` runs
# (strlowrank.analysis.tracks.entry_script)
ENTRY_POINT = "speech.train_gru"
