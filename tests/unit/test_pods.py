"""build_pod: naming, labels, ownership, container, resources, volumes, security defaults."""

from __future__ import annotations

from jobkit import make_spec

from finetune_operator.pods import build_pod

ENV = {"FT_MODEL": "tiny/model", "FT_MAX_STEPS": "1000", "FT_METRICS_PORT": "9400"}


def _pod(**extra):
    return build_pod("ft", "team-a", "uid-123", make_spec(**extra), 3, trainer_env=ENV)


def test_identity_labels_and_owner():
    pod = _pod(template={"metadata": {"labels": {"team": "nlp", "finetune.dev/attempt": "99"},
                                      "annotations": {"sim.finetune.dev/outcome": "succeed"}}})
    meta = pod["metadata"]
    assert (pod["apiVersion"], pod["kind"], meta["name"], meta["namespace"]) == ("v1", "Pod", "ft-3", "team-a")
    assert meta["labels"] == {"team": "nlp", "finetune.dev/job-name": "ft", "finetune.dev/attempt": "3",
                              "app.kubernetes.io/managed-by": "finetune-operator"}
    assert meta["annotations"] == {"sim.finetune.dev/outcome": "succeed"}
    assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob", "name": "ft",
                                        "uid": "uid-123", "controller": True, "blockOwnerDeletion": True}]


def test_container_and_pod_basics():
    pod = _pod()
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "trainer"
    assert container["image"] == "registry.example/trainer:1"
    assert container["command"] == ["python", "-m", "finetune_trainer"]
    assert container["env"] == [{"name": k, "value": v} for k, v in sorted(ENV.items())]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec and "nodeSelector" not in spec


def test_gpu_requests_equal_limits_and_memory_is_limited():
    container = _pod(resources={"gpus": 2, "cpu": "8", "memory": "64Gi"})["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"},
        "limits": {"nvidia.com/gpu": "2", "memory": "64Gi"},
    }


def test_no_gpu_no_gpu_resource():
    container = _pod(resources={"gpus": 0})["spec"]["containers"][0]
    assert container["resources"] == {}


def test_checkpoint_volume_pvc_or_empty_dir():
    with_pvc = _pod(checkpoint={"claimName": "ckpt", "mountPath": "/ck"})
    assert with_pvc["spec"]["volumes"][0] == {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}}
    # only the job's own directory of the claim: trainingjobs/<namespace>/<name>/<uid>
    shm = {"name": "dshm", "mountPath": "/dev/shm"}  # memory-backed, for NCCL
    assert with_pvc["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "checkpoints", "mountPath": "/ck", "subPath": "trainingjobs/team-a/ft/uid-123"}, shm
    ]
    scratch = _pod()
    assert scratch["spec"]["volumes"] == [{"name": "checkpoints", "emptyDir": {}},
                                          {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    assert scratch["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "checkpoints", "mountPath": "/checkpoints"}, shm]


def test_a_template_shm_volume_replaces_ours():
    pod = _pod(template={"volumes": [{"name": "big-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
                         "volumeMounts": [{"name": "big-shm", "mountPath": "/dev/shm"}]})
    assert [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]].count("/dev/shm") == 1
    assert "dshm" not in {v["name"] for v in pod["spec"]["volumes"]}


def test_resume_from_mounts_the_named_checkpoint_read_only():
    from finetune_operator.trainer_env import trainer_env

    def pod_of(**extra):
        spec = make_spec(**extra)
        return build_pod("ft", "team-a", "uid-123", spec, 3, trainer_env=trainer_env(spec))

    pod = pod_of(checkpoint={"claimName": "ckpt", "resumeFrom": "pvc://ckpt/trainingjobs/team-a/old/u1/checkpoints/checkpoint-40"})
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert mounts[1] == {"name": "checkpoints", "mountPath": "/resume-from", "readOnly": True,
                         "subPath": "trainingjobs/team-a/old/u1/checkpoints/checkpoint-40"}
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["FT_RESUME_FROM"] == "/resume-from"
    assert "FT_RESUME_FROM" not in {
        e["name"] for e in pod_of(checkpoint={"claimName": "ckpt"})["spec"]["containers"][0]["env"]
    }


def test_restricted_security_defaults():
    spec = _pod()["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = spec["containers"][0]["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_template_security_context_keys_replace_defaults():
    spec = _pod(
        template={"securityContext": {"runAsUser": 2000}, "containerSecurityContext": {"readOnlyRootFilesystem": True}}
    )["spec"]
    assert spec["securityContext"]["runAsUser"] == 2000 and spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_template_overrides_are_applied():
    template = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "priorityClassName": "training",
        "schedulerName": "kai",
        "serviceAccountName": "trainer",
        "imagePullSecrets": [{"name": "regcred"}],
        "env": [
            {"name": "FT_MAX_STEPS", "value": "5"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}},
        ],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
    }
    spec = _pod(template=template)["spec"]
    assert spec["nodeSelector"] == {"gpu": "h100"}
    assert spec["tolerations"] == template["tolerations"]
    assert spec["affinity"] == template["affinity"]
    assert (spec["priorityClassName"], spec["schedulerName"], spec["serviceAccountName"]) == (
        "training",
        "kai",
        "trainer",
    )
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["FT_MAX_STEPS"] == {"name": "FT_MAX_STEPS", "value": "5"}  # template wins
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "t"}}
    assert len([e for e in spec["containers"][0]["env"] if e["name"] == "FT_MAX_STEPS"]) == 1
    assert spec["volumes"][1] == template["volumes"][0]
    assert spec["containers"][0]["volumeMounts"][1] == {"name": "data", "mountPath": "/data", "readOnly": True}


def test_build_pod_does_not_share_mutable_state_with_the_spec():
    spec = make_spec(template={"tolerations": [{"key": "a"}]})
    pod = build_pod("ft", "ns", "u", spec, 1, trainer_env={})
    pod["spec"]["tolerations"][0]["key"] = "changed"
    assert spec.template.tolerations[0]["key"] == "a"
