"""Poison-sample detection as reusable functions (no CLI, no files): feature points found generically,
the published detectors' scores over (features, labels) or (model, images), and one metric code.

``burnkit.detectors`` wraps each in BackdoorBench's ``detection_pretrain/<m>.py`` lifecycle; defenses
that filter their training set (AC, Spectral, ABL) call the same functions.
"""
