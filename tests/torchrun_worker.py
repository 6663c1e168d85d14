"""
Many trainings in one torchrun launch (a launch costs tens of seconds; a training of the tiny models, a few):

    torchrun --nproc_per_node=2 tests/torchrun_worker.py SPEC.json

SPEC.json: {"timeout_s": ..., "runs": [{"name": ..., "cfg": {...}}, ...]}. Each run calls its stage script's train()
with conftest.training_defaults() updated by its cfg, in the process group this script initialised. A collective that
does not complete within timeout_s fails instead of hanging. A ValueError (the project's refusals) is recorded and the next run
starts; any other error prints its traceback and ends the launch. Each rank writes <SPEC>.rank<r>.json: per run, the
last log record or the error, and the high-water mark of the resident memory (kB) reached before the training loop
started, counted from the resident memory at the run's start.
"""
import datetime
import gc
import json
import os
import re
import sys
import traceback
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import run as runner  # noqa: E402
from conftest import stage_train, training_defaults  # noqa: E402

torch.set_num_threads(1)


def status_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak():
    """Start the resident-memory high-water mark (VmHWM) again from the current resident memory (Linux)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec.get("timeout_s", 120)))
    rank = dist.get_rank()
    results, mark = {}, {}
    loop_signals = runner.stop_signals

    @contextmanager
    def at_loop_start():  # train() enters this right before its first step: what came before was start-up
        mark["startup_kb"] = status_kb("VmHWM") - mark["base_kb"]
        with loop_signals() as got:
            yield got
    runner.stop_signals = at_loop_start

    for run in spec["runs"]:
        print(f"rank {rank}: {run['name']}", flush=True)
        mark.clear()
        reset_peak()
        mark["base_kb"] = status_kb("VmRSS")
        try:
            last = stage_train(training_defaults(**run["cfg"]))
            results[run["name"]] = dict(last=last, startup_kb=mark.get("startup_kb"))
        except ValueError as e:
            results[run["name"]] = dict(error=str(e))
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # the other rank may be stuck in a collective: do not wait for it
        with open(f"{spec_path}.rank{rank}.json", "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
