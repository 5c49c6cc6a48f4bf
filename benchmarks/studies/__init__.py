"""The studies that ship, one file each; a run prints them in the order of :data:`STUDY_FILES`.

A study file defines ``study(settings) -> StudyResult`` decorated with
:func:`benchmarks.harness.register_study`; adding one is the file plus its name in :data:`STUDY_FILES`.
"""

from importlib import import_module

#: the study files of this folder, in run order
STUDY_FILES = ("step", "scaling", "torch_compile", "methods")

for _name in STUDY_FILES:
    import_module(f"{__name__}.{_name}")
