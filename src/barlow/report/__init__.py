"""The reproduction report: the paper's numbers beside this run's, its claims tested,
pretraining curves, evaluation bars, held-out cross-correlation matrices and ablations.

One module per concern, in the order the data flows:

- ``inputs``      dvclive metrics files and curves (a missing one is "not run")
- ``profiles``    snapshots of finished runs of other profiles, set beside this run
- ``seeds``       mean ± std over seeds; this run's seed replicas
- ``ablations``   `dvc exp show` parsed, finished experiments grouped per study
- ``crosscorr``   the cross-correlation of held-out pairs before and after training
- ``claims``      the paper's claims tested on the metrics; our value for each figure
- ``figures``     the PNGs
- ``document``    the document model, its Markdown and HTML, and writing them
- ``build``       everything read → the report's content

Everything but ``crosscorr``'s checkpoint and FFCV readers takes plain values (dicts of
metrics, curves, parsed experiments), so that the report can be built from fabricated
files in tests. A missing input is never an error: its rows say "not run".
"""
