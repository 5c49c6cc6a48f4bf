"""A search worker process for the study tests: ``python search_worker_script.py STORAGE STUDY SAMPLER SLEEP GRACE``.

It runs trials of one study of a one-method search (``--lr`` on a log grid of 6 values, or TPE with 6 trials) with
an objective that sleeps ``SLEEP`` seconds and returns ``-log10(lr)``; each trial it starts is announced on standard
output as ``started <number>`` so that a test can kill the worker in the middle of one.
"""

from __future__ import annotations

import math
import sys
import time

from flexlora_pl.experiments import search_study
from flexlora_pl.experiments.search_space import parse_search


def search(sampler: str):
    section = {"sampler": sampler, "params": {"--lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}}
    if sampler == "grid":
        section["params"]["--lr"]["steps"] = 6
    else:
        section["trials"] = 6
    return parse_search(section, ["lora"], ["task"])


def main() -> None:
    url, name, sampler, sleep, grace = sys.argv[1:6]
    spec = search(sampler)
    study = search_study.load_study(search_study.open_storage(url), name, spec)

    def objective(trial) -> float:
        print(f"started {trial.number}", flush=True)
        time.sleep(float(sleep))
        return -math.log10(trial.params["lr"])

    ran = search_study.run_trials(study, spec.trials["lora"], spec, "lora", objective, heartbeat_s=0.5,
                                  grace_s=float(grace))
    print(f"ran {ran}", flush=True)


if __name__ == "__main__":
    main()
