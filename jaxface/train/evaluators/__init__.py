"""Evaluators of a training run, in the style of big_vision's ``evaluators/``.

Each is built once with everything it reads (held-out data, the training
split as a cohort, its config group) and then asked ``run(params, rest)``,
which yields ``("eval/<name>", value)`` pairs. ``verification``: held-out
face verification and identification, with test-time augmentation, S-norm
and Fisherfaces fusion.
"""
