"""A random-architecture fuzzer for fxmerge (issue #17).

* ``spec``      frozen network descriptions, shapes, ``to_source()``;
* ``build``     the ``nn.Module`` a description stands for, seeded;
* ``generate``  random descriptions: hypothesis strategy, seeded generator, replayer;
* ``forms``     the adapter: the only use of fxmerge's non-public API (three graph forms);
* ``checks``    the properties, per form and across forms;
* ``known``     filed library bugs kept out of the default runs;
* ``shrink``    shrinking of seeded failures; ``runner``: the long run.

Runs: ``tests/test_fuzz.py``; findings: ``tests/fuzz/FINDINGS.md``; regression
tests: ``tests/fuzz/test_regressions.py``.
"""
