"""Hostile input (Acto-style misoperations): generated TrainingJob manifests with mutated,
mistyped, out-of-range and unknown fields, and objects corrupted past validation.

Every generated manifest is POSTed to the API server (fieldValidation=Strict, as kubectl
does). It is either
- rejected with a message that names the field (or the rule) that was broken, or
- accepted, and then the operator drives it to a clear state within a deadline:
  Failed/InvalidSpec naming the field when the operator's pydantic models refuse what the
  CRD schema let through, Failed/PrivilegedTemplate for privileged settings, otherwise a
  pod, Suspended, or a phase whose reason says why there is no pod.
The operator process never crashes or restarts (same pid) and logs no traceback.

Objects corrupted past validation (written straight into etcd, which is how a newer
operator's phase, a bad restore or a bit flip arrive): an unknown phase, absurd counters,
nonsense conditions; and a pod that carries the job's labels without an ownerReference."""
from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune_operator.api.models import MAX_ATTEMPTS, PHASES
from finetune_operator.api.parsing import SpecError, parse_spec
from finetune_operator.core.privileged import privileged_settings
from finetune_operator.pods import build_pod
from finetune_operator.trainer_env import trainer_env
from finetune_testbed.jobs import Jobs, job_manifest, sim
from finetune_testbed.kuberaw import ApiError, Kube
from finetune_testbed.operator_proc import FAST_ARGS, OperatorProcess
from finetune_testbed.procs import wait_for
from finetune_testbed.reliability import ApiJobs, EtcdRaw, create_namespace

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GPU_NODES = 2
TJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/trainingjobs"
OUTCOMES: Counter = Counter()

# path -> the kind of value the schema expects there
SPEC_FIELDS = {
    ("image",): "str", ("model",): "str", ("dataset",): "obj", ("dataset", "path"): "str",
    ("dataset", "textField"): "str", ("dataset", "promptField"): "str",
    ("dataset", "completionField"): "str", ("method",): "str",
    ("lora",): "obj", ("lora", "r"): "int", ("lora", "alpha"): "int", ("lora", "dropout"): "float",
    ("lora", "targetModules"): "strlist", ("hyperparameters",): "obj",
    ("hyperparameters", "maxSteps"): "int", ("hyperparameters", "epochs"): "float",
    ("hyperparameters", "learningRate"): "float", ("hyperparameters", "batchSize"): "int",
    ("hyperparameters", "seed"): "int", ("hyperparameters", "sequenceLength"): "int",
    ("resources", "gpus"): "int", ("resources", "cpu"): "quantity", ("resources", "memory"): "quantity",
    ("workers",): "int", ("checkpoint", "claimName"): "str", ("checkpoint", "mountPath"): "str",
    ("checkpoint", "everySteps"): "int", ("checkpoint", "keep"): "int",
    ("checkpoint", "resumeFrom"): "resume", ("runPolicy", "stallTimeoutSeconds"): "int",
    ("runPolicy", "firstStepTimeoutSeconds"): "int",
    ("runPolicy", "backoffLimit"): "int", ("runPolicy", "maxResumes"): "int",
    ("runPolicy", "activeDeadlineSeconds"): "int", ("runPolicy", "backoffSeconds"): "int",
    ("runPolicy", "maxBackoffSeconds"): "int", ("runPolicy", "startTimeoutSeconds"): "int",
    ("runPolicy", "autoResume"): "bool", ("runPolicy", "terminationGracePeriodSeconds"): "int",
    ("failurePolicy", "rules"): "rules", ("suspend",): "bool",
    ("template", "nodeSelector"): "strmap", ("template", "metadata", "labels"): "strmap",
    ("template", "tolerations"): "objlist", ("template", "env"): "env",
    ("template", "priorityClassName"): "str", ("template", "schedulerName"): "str",
    ("template", "hostNetwork"): "bool", ("template", "volumes"): "objlist",
    ("template", "securityContext"): "obj", ("template", "affinity"): "obj",
}
UNKNOWN_FIELDS = [("bogus",), ("lora", "rank"), ("runPolicy", "retries"), ("template", "hostPID"),
                  ("hyperparameters", "max_steps")]

NASTY_STRINGS = ["", " ", "   ", "\t\n", "x" * 300, "abc def", "-", "/abs/path", "q_proj",
                 "1e3", "500m", "32Gi", "-5", "Gi", "null", "ünïcode", "a" * 2000, "$(VAR)"]
EDGE_INTS = [0, -1, 1, 2, 63, 64, 65, 100, 101, 1024, 1025, 2**31 - 1, 2**31, 2**53, 2**63 - 1, -2**63]

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(EDGE_INTS),
                    st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.sampled_from(NASTY_STRINGS), st.text(max_size=12))
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                        | st.dictionaries(st.text(min_size=1, max_size=8), c, max_size=3),
                        max_leaves=6)
label_keys = st.sampled_from(["app", "team", "bad key", "x/y/z", "-lead", "a" * 70, "ok.example/x"])
TYPED = {
    "str": st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=30)),
    "int": st.one_of(st.integers(1, 64), st.sampled_from(EDGE_INTS), st.integers(-(10**6), 10**9)),
    "float": st.one_of(
        st.floats(0.001, 1.0),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([0, 0.0, -0.0, 1e-300, 10.0, 10.5, 3]),
    ),
    "bool": st.booleans(),
    "quantity": st.one_of(
        st.sampled_from(["1", "500m", "32Gi", "1e3", "-1", "1.5", "Gi", "", "abc", "0.5Ki"]), st.integers(-5, 10**6)
    ),
    "strlist": st.lists(st.sampled_from(NASTY_STRINGS), max_size=4),
    "strmap": st.dictionaries(label_keys, st.sampled_from(["v", "", "bad value", "x" * 70, "ok-1"]), max_size=3),
    "objlist": st.lists(
        st.dictionaries(
            st.sampled_from(["key", "operator", "effect", "name", "hostPath", "emptyDir", "bogus"]),
            st.one_of(st.sampled_from(["Exists", "NoSchedule", "x", ""]), st.just({}), st.just({"path": "/etc"})),
            max_size=3,
        ),
        max_size=2,
    ),
    "env": st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["FOO", "1BAD", "with space", "", "A=B"])},
            optional={"value": st.sampled_from(["x", ""]), "valueFrom": st.just({"secretKeyRef": {"name": "s"}})},
        ),
        max_size=2,
    ),
    "rules": st.lists(
        st.fixed_dictionaries(
            {"action": st.sampled_from(["Resume", "Fail", "Count", "Explode"])},
            optional={
                "onExitCodes": st.fixed_dictionaries(
                    {
                        "operator": st.sampled_from(["In", "NotIn", "Maybe"]),
                        "values": st.lists(st.sampled_from([0, 1, 137, 255, 256, -1]), max_size=3),
                    }
                ),
                "onPodConditions": st.lists(
                    st.fixed_dictionaries({"type": st.sampled_from(["DisruptionTarget", ""])}), max_size=2
                ),
            },
        ),
        max_size=2,
    ),
    "obj": anything,
    "resume": st.one_of(
        st.sampled_from(
            [
                "pvc://ckpt/trainingjobs/ns/old/u/checkpoints/checkpoint-5",
                "pvc://other/x",
                "pvc://ckpt/a/../b",
                "/abs",
                "pvc://",
                "",
            ]
        ),
        st.text(max_size=12),
    ),
}


@st.composite
def mutation(draw):
    if draw(st.integers(0, 9)) == 0:
        return ("set", draw(st.sampled_from(UNKNOWN_FIELDS)), draw(scalars))
    path = draw(st.sampled_from(sorted(SPEC_FIELDS)))
    op = draw(st.sampled_from(["set", "set", "set", "delete"]))
    kind = SPEC_FIELDS[path]
    value = draw(st.one_of(TYPED[kind], TYPED[kind], anything)) if op == "set" else None
    return (op, path, value)


def apply_mutations(manifest: dict, mutations) -> dict:
    spec = manifest["spec"]
    for op, path, value in mutations:
        node = spec
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if op == "delete":
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return manifest


def dotted(path) -> str:
    return "spec." + ".".join(path)


def field_named(message: str, mutations) -> bool:
    """Does the API server's message point at one of the mutated fields (or a parent)?"""
    for _, path, _ in mutations:
        for n in range(len(path), 0, -1):
            if dotted(path[:n]) in message:
                return True
    return "spec:" in message or "spec " in message  # a rule on spec itself


@pytest.fixture(scope="module")
def bad_ns(rel_cluster):
    return create_namespace(rel_cluster, f"badinput-{uuid.uuid4().hex[:5]}")


@pytest.fixture(scope="module")
def bad_operator(rel_cluster, bad_ns):
    op = OperatorProcess(
        rel_cluster.kubeconfig, rel_cluster.log_dir, name="badinput-operator", args=FAST_ARGS + ["--namespace", bad_ns]
    )
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def kube(rel_cluster):
    k = Kube(rel_cluster.kubeconfig)
    yield k
    k.close()


def assert_operator_healthy(op: OperatorProcess, pid: int) -> None:
    assert op.running() and op.pid == pid, f"operator restarted or died:\n{op.log_tail(40)}"
    text = op.proc.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[text.index("Traceback") - 300 :][:3000]


def pod_refused_by_api(kube: Kube, namespace: str, job: dict, spec) -> tuple[int, str] | None:
    """(HTTP status, message) of the API server's refusal of the pod the operator would build
    for this job (a server-side dry run: validation and admission), or None if accepted."""
    pod = build_pod(job["metadata"]["name"], namespace, job["metadata"]["uid"], spec, 1, trainer_env=trainer_env(spec))
    pod["metadata"]["name"] += "-dry-run"  # the operator may have created the real one already
    try:
        kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", query={"dryRun": "All"}, body=pod)
    except ApiError as exc:
        if exc.status in (400, 403, 422):
            return exc.status, exc.message
        raise
    return None


def base_manifest(name: str) -> dict:
    return job_manifest(name, template=sim(outcome="run"))


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(mutations=st.lists(mutation(), min_size=1, max_size=2))
@example(mutations=[("set", ("image",), "   ")])  # CRD: size > 0; pydantic: blank
@example(mutations=[("set", ("workers",), 1025)])  # schema maximum
@example(mutations=[("set", ("bogus",), 1)])  # unknown field
@example(mutations=[("set", ("lora", "r"), "eight")])  # wrong type
@example(mutations=[("set", ("resources", "gpus"), 9)])  # valid, unschedulable
@example(mutations=[("set", ("template", "hostNetwork"), True)])  # privileged
@example(mutations=[("set", ("template", "env"), [{"name": "1BAD"}])])  # pod creation refused
@example(mutations=[("set", ("template", "tolerations"), [{"operator": "x"}])])
def test_generated_manifests_are_rejected_clearly_or_driven_to_a_clear_state(
    rel_cluster, bad_ns, bad_operator, kube, mutations
):
    pid = bad_operator.pid
    jobs = ApiJobs(rel_cluster, bad_ns)
    name = f"bad-{uuid.uuid4().hex[:8]}"
    manifest = apply_mutations(base_manifest(name), mutations)
    try:
        kube.request("POST", TJ_PATH.format(ns=bad_ns), query={"fieldValidation": "Strict"}, body=manifest)
    except ApiError as exc:
        assert exc.status in (400, 422), f"{exc.status}: {exc.message}"
        assert field_named(exc.message, mutations), (
            f"rejection does not name the field: {exc.message!r} for {mutations}"
        )
        OUTCOMES["rejected"] += 1
        assert_operator_healthy(bad_operator, pid)
        return
    try:
        stored = jobs.get(name)
        try:
            spec = parse_spec(stored["spec"])
            spec_error = None
        except SpecError as exc:
            spec, spec_error = None, exc
        if spec_error is not None:
            status = jobs.wait(name, lambda s: s.get("phase") == "Failed", 30, "Failed/InvalidSpec")
            assert status["reason"] == "InvalidSpec", status
            assert spec_error.field and spec_error.field in status["message"], (spec_error.field, status)
            assert jobs.pods(name) == []
            OUTCOMES["accepted, InvalidSpec"] += 1
        elif privileged_settings(spec):
            status = jobs.wait(name, lambda s: s.get("phase") == "Failed", 30, "Failed/PrivilegedTemplate")
            assert status["reason"] == "PrivilegedTemplate", status
            OUTCOMES["accepted, PrivilegedTemplate"] += 1
        elif refusal := pod_refused_by_api(kube, bad_ns, stored, spec):
            code, refused = refusal
            if code == 403:
                # Admission refused it (e.g. no such PriorityClass): it may clear later, so
                # the job waits in Queued, saying why.
                status = jobs.wait(name, lambda s: s.get("reason") == "PodForbidden", 30, "Queued/PodForbidden")
                assert status["phase"] == "Queued", status
                OUTCOMES["accepted, PodForbidden"] += 1
            else:
                # Valid for the CRD and the models, invalid as a pod: the job must fail,
                # naming the refusal (not retry the creation forever).
                status = jobs.wait(name, lambda s: s.get("phase") == "Failed", 30, "Failed/PodRejected")
                assert status["reason"] == "PodRejected", status
                fields = re.findall(r"spec\.[A-Za-z0-9_.\[\]]*[A-Za-z0-9_\]]", refused)
                assert "refused" in status["message"], status["message"]
                assert not fields or fields[0] in status["message"], (refused, status["message"])
                OUTCOMES["accepted, pod refused: PodRejected"] += 1
        else:

            def clear():
                s = jobs.status(name)
                if s.get("phase") == "Suspended" or jobs.pods(name):
                    return s
                if s.get("phase") and s.get("reason") not in (None, "CreatingPod"):
                    return s
                return None

            try:
                status = wait_for(clear, 30, f"{name}: a pod, Suspended, or a reason")
            except TimeoutError:
                raise AssertionError(
                    f"accepted valid job has no pod and no reason after 30s: "
                    f"{json.dumps(jobs.status(name))}; spec {json.dumps(stored['spec'])}; operator log:\n"
                    f"{bad_operator.log_tail(8)}"
                ) from None
            assert status.get("reason") != "InvalidSpec", status
            OUTCOMES[f"accepted, {status.get('phase')}/{status.get('reason')}"] += 1
        assert_operator_healthy(bad_operator, pid)
    finally:
        rel_cluster.kubectl("delete", "tj", name, "-n", bad_ns, "--wait=false", check=False)


def test_pod_refused_by_the_api_server_fails_the_job_clearly(rel_cluster, bad_ns, bad_operator, kube):
    jobs = ApiJobs(rel_cluster, bad_ns)
    manifest = job_manifest("refused", template={**sim(outcome="run"), "tolerations": [{"operator": "x"}]})
    jobs.apply(manifest)
    stored = jobs.get("refused")
    assert pod_refused_by_api(kube, bad_ns, stored, parse_spec(stored["spec"]))[0] == 422
    try:
        status = jobs.wait(
            "refused", lambda s: s.get("reason") not in (None, "CreatingPod"), 20, "a reason other than CreatingPod"
        )
        assert (status["phase"], status["reason"]) == ("Failed", "PodRejected"), status
        said = (status.get("message") or "") + " ".join(e.get("message", "") for e in jobs.events("refused"))
        assert "tolerations" in said, status
        assert jobs.pods("refused") == []
    finally:
        rel_cluster.kubectl("delete", "tj", "refused", "-n", bad_ns, "--wait=false", check=False)


def test_pod_forbidden_by_admission_is_reported(rel_cluster, bad_ns, bad_operator, kube):
    jobs = ApiJobs(rel_cluster, bad_ns)
    jobs.apply(job_manifest("forbidden", template={**sim(outcome="run"), "priorityClassName": "no-such-class"}))
    stored = jobs.get("forbidden")
    assert pod_refused_by_api(kube, bad_ns, stored, parse_spec(stored["spec"]))[0] == 403
    pid = bad_operator.pid
    try:
        status = jobs.wait(
            "forbidden", lambda s: s.get("reason") not in (None, "CreatingPod"), 20, "a reason other than CreatingPod"
        )
        said = (status.get("message") or "") + " ".join(e.get("message", "") for e in jobs.events("forbidden"))
        assert "no-such-class" in said or "PriorityClass" in said, status
    finally:
        assert_operator_healthy(bad_operator, pid)
        rel_cluster.kubectl("delete", "tj", "forbidden", "-n", bad_ns, "--wait=false", check=False)


def test_zz_bad_input_outcomes_summary():
    """Printed for the record: how the generated manifests were handled."""
    print("\nbad input outcomes:", dict(OUTCOMES))
    if OUTCOMES:
        assert OUTCOMES["rejected"] >= 1


# --- objects corrupted past validation ------------------------------------------------------------
def _running_job(rel_cluster, jobs: Jobs, name: str) -> dict:
    jobs.apply(job_manifest(name, template=sim(outcome="run")))
    return jobs.wait(
        name,
        lambda s: s.get("phase") == "Running" and any(p["status"].get("phase") == "Running" for p in jobs.pods(name)),
        60,
        f"{name} Running",
    )


def test_status_subresource_refuses_garbage_with_field_names(rel_cluster, bad_ns, bad_operator):
    jobs = ApiJobs(rel_cluster, bad_ns)
    _running_job(rel_cluster, jobs, "garbage")
    for patch, field in [
        ({"phase": "Exploded"}, "status.phase"),
        ({"attempt": -1}, "status.attempt"),
        ({"attempt": 2**62}, "status.attempt"),
        ({"conditions": [{"type": "X", "status": "Maybe"}]}, "status.conditions[0].status"),
        ({"startTime": "yesterday"}, "status.startTime"),
    ]:
        res = rel_cluster.kubectl(
            "patch",
            "tj",
            "garbage",
            "-n",
            bad_ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": patch}),
            check=False,
        )
        assert res.returncode != 0 and field in res.stderr, (patch, res.stderr)
    assert jobs.status("garbage")["phase"] == "Running"


def _corrupt_and_watch(rel_cluster, bad_ns, bad_operator, name, corrupt):
    """Write `corrupt(status)` into etcd, then wait for the operator to write a valid status."""
    jobs = ApiJobs(rel_cluster, bad_ns)
    before = _running_job(rel_cluster, jobs, name)
    pid = bad_operator.pid
    pods_before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in jobs.pods(name)}
    etcd = EtcdRaw(rel_cluster)
    stored = etcd.mutate_job(bad_ns, name, lambda obj: corrupt(obj["status"]))
    jobs.wait(name, lambda s: s.get("phase") in PHASES and s != stored["status"], 30, "the operator rewrote the status")
    time.sleep(3)  # let it settle
    assert_operator_healthy(bad_operator, pid)
    live = [p for p in jobs.pods(name) if p["status"].get("phase") not in ("Succeeded", "Failed")]
    assert len(live) <= 1, [p["metadata"]["name"] for p in live]
    return before, jobs.status(name), pods_before, jobs.pods(name)


def test_unknown_phase_in_etcd_is_repaired_without_killing_the_running_pod(rel_cluster, bad_ns, bad_operator):
    """A status phase no schema allows (a newer operator's phase after a rollback, a bad
    restore): the operator must not crash and must write a valid phase again. The running
    attempt's pod is healthy, so a repair that re-derives the phase from the pods keeps it;
    one that treats the job as new deletes a healthy trainer."""
    before, after, pods_before, pods_after = _corrupt_and_watch(
        rel_cluster, bad_ns, bad_operator, "unknownphase", lambda st: st.update(phase="Exploded")
    )
    assert after["phase"] in ("Running", "Queued", "Starting", "Resuming"), after
    kept = {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in pods_after
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    }
    assert kept == pods_before, (
        f"the healthy pod of attempt {before['attempt']} was replaced: before {pods_before}, "
        f"after {kept}; status now {after['phase']}/{after.get('reason')} attempt {after['attempt']}"
    )
    assert after["attempt"] == before["attempt"], after


def test_absurd_counters_in_etcd_do_not_crash_the_operator(rel_cluster, bad_ns, bad_operator):
    """attempt 2**63-1 (one increment from overflowing int64) with nonsense conditions: the
    operator keeps running and writes a valid status again (it may start a new attempt)."""

    def corrupt(st):
        st.update(
            attempt=2**63 - 1,
            failures=2**40,
            resumes=7,
            restarts=-3,
            conditions=[{"type": "Running", "status": "Perhaps"}, {"bogus": True}, "junk"],
        )

    _, after, _, pods = _corrupt_and_watch(rel_cluster, bad_ns, bad_operator, "absurd", corrupt)
    assert after["phase"] in ("Running", "Queued", "Starting", "Resuming", "Failed"), after
    assert after["attempt"] <= MAX_ATTEMPTS and after["failures"] <= MAX_ATTEMPTS, after
    assert all(c.get("status") in ("True", "False", "Unknown") for c in after.get("conditions", []))


def test_pod_with_job_labels_but_no_owner_is_not_adopted(rel_cluster, bad_ns, bad_operator):
    jobs = ApiJobs(rel_cluster, bad_ns)
    pid = bad_operator.pid
    before = _running_job(rel_cluster, jobs, "owned")
    labels = {"finetune.dev/job-name": "owned", "app.kubernetes.io/managed-by": "finetune-operator"}

    def stray(name, attempt):
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {**labels, "finetune.dev/attempt": str(attempt)},
                "annotations": {"sim.finetune.dev/outcome": "fail", "sim.finetune.dev/run-for": "1s"},
            },
            "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "example.invalid/x:1"}]},
        }

    # a later attempt's pod name (would be adopted by a label-only match) that then fails
    rel_cluster.apply(stray("owned-7", 7), "-n", bad_ns)
    wait_for(
        lambda: any(
            p["metadata"]["name"] == "owned-7" and p["status"].get("phase") == "Failed" for p in jobs.pods("owned")
        ),
        30,
        "stray pod ran and failed",
    )
    time.sleep(6)  # more than the operator's safety-net timer
    after = jobs.status("owned")
    assert (after["phase"], after["attempt"], after["failures"], after["resumes"]) == (
        "Running",
        before["attempt"],
        0,
        0,
    ), after
    stray_pod = next(p for p in jobs.pods("owned") if p["metadata"]["name"] == "owned-7")
    assert not stray_pod["metadata"].get("ownerReferences"), "the operator took over a foreign pod"
    assert_operator_healthy(bad_operator, pid)


def _squatted_job(rel_cluster, bad_ns, name: str) -> tuple[Jobs, dict]:
    """Job `name` whose first pod name is already taken by a pod it does not control."""
    jobs = ApiJobs(rel_cluster, bad_ns)
    labels = {
        "finetune.dev/job-name": name,
        "finetune.dev/attempt": "1",
        "app.kubernetes.io/managed-by": "finetune-operator",
    }
    rel_cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-1", "labels": labels, "annotations": {"sim.finetune.dev/outcome": "run"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "example.invalid/x:1"}]},
        },
        "-n",
        bad_ns,
    )
    jobs.apply(job_manifest(name, template=sim(outcome="run")))
    jobs.wait(name, lambda s: bool(s.get("phase")), 30, "a phase")
    time.sleep(6)  # several reconciles, more than the safety-net timer
    return jobs, jobs.status(name)


def test_foreign_pod_squatting_the_next_pod_name_is_not_adopted(rel_cluster, bad_ns, bad_operator):
    """The job's next pod name is taken by a pod the job does not control: the operator
    must neither take it for the job's attempt nor crash."""
    pid = bad_operator.pid
    jobs, status = _squatted_job(rel_cluster, bad_ns, "squat")
    assert status.get("phase") not in ("Running", "Starting"), (
        f"a foreign pod was taken for the job's attempt: {status}"
    )
    assert (status["attempt"], status["failures"], status["resumes"]) == (1, 0, 0), status
    pod = next(p for p in jobs.pods("squat") if p["metadata"]["name"] == "squat-1")
    assert not pod["metadata"].get("ownerReferences"), "the operator took over a foreign pod"
    assert pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
    assert_operator_healthy(bad_operator, pid)


def test_foreign_pod_squatting_the_next_pod_name_is_reported_to_the_user(rel_cluster, bad_ns, bad_operator):
    jobs, status = _squatted_job(rel_cluster, bad_ns, "squat2")
    said = (status.get("message") or "") + " ".join(e.get("message", "") for e in jobs.events("squat2"))
    assert "squat2-1" in said and ("not controlled" in said or "exists" in said), (
        f"nothing tells the user that pod squat2-1 blocks the job: status "
        f"{status.get('phase')}/{status.get('reason')}: {status.get('message')}; "
        f"events {[e.get('message') for e in jobs.events('squat2')]}"
    )
