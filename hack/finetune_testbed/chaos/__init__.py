"""`python -m finetune_testbed.chaos --jobs N` (`make chaos JOBS=N`): N TrainingJobs on kwok
GPU nodes under random faults, then invariants.

1. A private control plane (its own etcd, API server, scheduler, controller-manager, kwok)
   with enough 8-GPU nodes for every job at once plus 20 %, the CRD, and one operator
   (fast test timings, --namespace chaos).
2. N jobs of 1-2 GPUs with simulated behaviours (sim.finetune.dev/* annotations):
   succeed    runs for a random time, then exits 0;
   fail       exits 1 after a few seconds on every attempt (backoffLimit 0-2);
   run        runs until something stops it;
   evict      is evicted by its kubelet after a few seconds on every attempt (maxResumes 1-2).
   Every third job is a 2-pod gang (spec.workers: 2); in their `fail` and `evict` jobs
   one rank (sim.finetune.dev/outcome-rank) fails or is evicted, the other keeps running.
   Half of the jobs take 1-6 s to exit after SIGTERM (a trainer saving its checkpoint;
   kwok runs a copy of stages.yaml whose pod-terminate stage reads
   sim.finetune.dev/terminate-after), so a replaced attempt's pod lingers.
3. Random faults for --fault-seconds, each recorded: operator SIGKILL (+ restart), operator
   SIGSTOP (+ SIGCONT), pod deletion, eviction (Eviction API), node drain (+ uncordon), node
   deletion (+ re-creation), node NotReady (+ Ready), an exit-code failure (a running pod
   annotated outcome=fail: kwok re-evaluates its stages) and, once, an API server + etcd
   crash and restart.
4. Faults stop, everything is recovered, and the run waits (with a deadline) until the
   statuses stop changing and match the pods; then checks the invariants:
   - no job lost: every created job exists and has a status;
   - never pods of two attempts of one job live at once (from every pod watch event);
   - no attempt with a partial gang left running: once a job's status says an attempt
     concluded (Resuming/Failed/Succeeded/Suspended), each of its pods is asked to stop within
     30 s and has ended within 60 s (invariants.STOP_GRACE_SECONDS, END_GRACE_SECONDS);
   - status matches the pods (Running has every rank's pod Running, finished jobs have none, ...);
   - every job at rest: finished, Running with its pod, or waiting with a reason;
   - each ended attempt counted exactly once: failures + resumes == attempts concluded,
     restarts == failures + resumes;
   - outcomes match what was injected: jobs that only saw disruptions (evictions, deletions,
     drains, node loss, operator faults) have no failures and did not fail (except `evict`
     jobs, which must fail with MaxResumesExceeded), `fail` jobs fail with
     BackoffLimitExceeded after backoffLimit+1 failures, failures never exceed the
     attempts that really exited non-zero;
   - Events agree with the counters: never more Warning Events than counted
     interruptions/failures (+1 for an uncounted failure); missing ones are reported;
   - the operator never died except when killed, and logged no traceback from its own code.
5. Prints the faults by kind, jobs by final phase, time to truth after the last fault, and
   the violations; exits 1 when there is any violation.
Options: --fault-seconds, --fault-rate, --settle-seconds, --seed (replays the job mix and
the fault choices; timing still varies), --weights kind=w,... (focus on some faults),
--json report.json, --artifacts DIR (keep the logs).

Modules: plans (the workload), trackers (the watches), faults (the injector and the
recovery), invariants (the checks, pure functions), report (the table), run (the steps of
a run and the command line); common holds what they share."""
from __future__ import annotations

from .report import Report
from .run import main, run

__all__ = ["Report", "main", "run"]
