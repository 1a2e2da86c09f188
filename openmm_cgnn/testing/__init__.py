"""Test and benchmark fixtures: small synthetic liquids written through the same writers as real data.

- :mod:`.cg_models`: CG configurations of a small ionic liquid (no AA run needed), random models
  and model directories, for tests of the model, export and OpenMM stages;
- :mod:`.known_potential`: a CG liquid with a known potential simulated in OpenMM, for training;
- :mod:`.brownian`: runs with known Brownian dynamics ("aa" and "cg" kinds), for the evaluation.

Nothing in the pipeline imports these; they live in the package so that tests and benchmarks share them.
"""
