"""The push of the output directory to an S3-compatible store (docs/TRAINER.md "Push"), against a
real MinIO server built from its Go module (hack/build/minio, `hack/build-binaries.sh minio`; the
first build takes minutes, then it is cached): the pushed objects are listed from the server, a
downloaded adapter loads with peft, a wrong credential fails before training with the store's
reason, and a store that goes away during training fails the attempt (exit 1, the adapter stays on
the volume) while the next attempt, finding the run complete, pushes the same objects again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from trainerkit import TrainerRun, make_env, wait_until

import finetune_contract as c

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
ROOT_USER, ROOT_PASSWORD = "finetune-test", "finetune-test-secret"
BUCKET = "adapters"
PREFIX = "team-a/support-bot"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def minio_binary() -> Path:
    out = subprocess.run(["bash", str(REPO / "hack/build-binaries.sh"), "minio"], check=True, timeout=3600,
                         capture_output=True, text=True).stdout
    binary = Path(out.strip().splitlines()[-1]) / "minio"
    assert binary.is_file(), f"hack/build-binaries.sh minio did not build {binary}"
    return binary


class MinioServer:
    """One `minio server` process on 127.0.0.1 over a data directory; stop() and start() again
    keep the data."""

    def __init__(self, binary: Path, data: Path, log: Path) -> None:
        self.binary, self.data, self.log = binary, data, log
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MINIO_ROOT_USER": ROOT_USER, "MINIO_ROOT_PASSWORD": ROOT_PASSWORD,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [str(self.binary), "server", str(self.data), "--address", f"127.0.0.1:{self.port}",
                 "--console-address", f"127.0.0.1:{_free_port()}", "--quiet"],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ready, 180, "MinIO to be ready")  # seconds alone; more on a loaded 2-core machine

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"minio exited {self.proc.returncode}: {self.log.read_text(errors='replace')[-2000:]}")
        # Ready for us means an authenticated call answers: /minio/health/ready can say 200 while
        # the server's IAM still initializes, and a request then waits (measured: 60 s).
        try:
            self.client(quick=True).list_buckets()
            return True
        except Exception:  # broad on purpose: not up yet (refused, 503, timeout)
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def client(self, quick: bool = False):
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=2), retries=False) if quick else None
        return Minio(f"127.0.0.1:{self.port}", access_key=ROOT_USER, secret_key=ROOT_PASSWORD, secure=False,
                     http_client=http)


@pytest.fixture
def minio(minio_binary, tmp_path):
    server = MinioServer(minio_binary, tmp_path / "minio-data", tmp_path / "minio.log")
    server.start()
    server.client().make_bucket(BUCKET)
    yield server
    server.stop()


def _push_env(tmp_path: Path, tiny_model: Path, text_data: Path, server: MinioServer, **ft: object) -> dict[str, str]:
    env = make_env(tmp_path, tiny_model, text_data, learning_rate=0.01, push_s3_bucket=BUCKET,
                   push_s3_prefix=PREFIX, push_s3_endpoint=server.endpoint, **{"save_steps": 100, **ft})
    env[c.ENV_CHECKPOINT_DIR] = str(tmp_path / "checkpoints")  # siblings, as the operator sets them
    env.update({"AWS_ACCESS_KEY_ID": ROOT_USER, "AWS_SECRET_ACCESS_KEY": ROOT_PASSWORD})
    env.pop("AWS_SESSION_TOKEN", None)
    return env


def _local_files(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}


def _pushed(server: MinioServer) -> dict[str, int]:
    objects = server.client().list_objects(BUCKET, prefix=PREFIX + "/", recursive=True)
    return {o.object_name.removeprefix(PREFIX + "/"): o.size for o in objects}


def test_push_lists_on_the_server_and_the_downloaded_adapter_loads(tmp_path, tiny_model, text_data, minio):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = TrainerRun(tmp_path, _push_env(tmp_path, tiny_model, text_data, minio, max_steps=3, merge="true"))
    assert run.wait(240) == 0, run.output()[-4000:]
    msg = run.termination()
    where = f"s3://{BUCKET}/{PREFIX}/"
    assert msg["outcome"] == c.OUTCOME_COMPLETED and msg["pushed"] == where
    assert f"pushed to {where}" in msg["message"]

    local = _local_files(run.out_dir)
    assert "adapter_model.safetensors" in local and f"{c.MERGED_SUBDIR}/model.safetensors" in local
    assert _pushed(minio) == local  # every file of the output directory, merged/ included, same sizes
    assert not [o for o in minio.client().list_objects(BUCKET, recursive=True)
                if not o.object_name.startswith(PREFIX + "/")]  # the writability probe left nothing

    downloaded = tmp_path / "downloaded"
    for name in local:
        if not name.startswith(c.MERGED_SUBDIR + "/"):
            minio.client().fget_object(BUCKET, f"{PREFIX}/{name}", str(downloaded / name))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
        base_logits = base(ids).logits
        from_store = PeftModel.from_pretrained(base, str(downloaded)).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
        from_volume = PeftModel.from_pretrained(base, str(run.out_dir)).eval()(ids).logits
    assert torch.equal(from_store, from_volume)
    assert not torch.allclose(from_store, base_logits, atol=1e-4)  # the trained LoRA, not an empty one


def test_wrong_credential_fails_before_training_with_the_stores_reason(tmp_path, tiny_model, text_data, minio):
    env = _push_env(tmp_path, tiny_model, text_data, minio, max_steps=3)
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    started = time.monotonic()
    run = TrainerRun(tmp_path, env)
    assert run.wait(120) == c.EXIT_CONFIG_ERROR, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == c.OUTCOME_CONFIG_ERROR and msg["pushed"] is None
    assert msg["message"].startswith(f"push to s3://{BUCKET}/{PREFIX}/: the store refused the check before training "
                                     "(SignatureDoesNotMatch: "), msg["message"]
    assert msg["step"] == 0 and not run.losses()  # refused before the model was loaded
    print(f"wrong credential: exit 78 after {time.monotonic() - started:.1f}s: {msg['message']}")

    env["AWS_SECRET_ACCESS_KEY"] = ROOT_PASSWORD
    env[c.ENV_PUSH_S3_BUCKET] = "no-such-bucket"
    run = TrainerRun(tmp_path, env, name="no-bucket")
    assert run.wait(120) == c.EXIT_CONFIG_ERROR, run.output()[-4000:]
    assert "bucket 'no-such-bucket' does not exist" in run.termination()["message"]


def test_store_lost_during_training_fails_the_attempt_and_the_next_one_pushes(tmp_path, tiny_model, text_data,
                                                                              minio):
    env = _push_env(tmp_path, tiny_model, text_data, minio, max_steps=4, save_steps=2, debug_step_delay=1)
    run = TrainerRun(tmp_path, env)
    wait_until(lambda: run.last_step() >= 1, 120, "the first step", run)  # the check before training passed
    minio.stop()
    assert run.wait(240) == c.EXIT_ERROR, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == c.OUTCOME_ERROR and msg["pushed"] is None
    assert msg["message"].startswith(f"PushError: push to s3://{BUCKET}/{PREFIX}/: upload of "), msg["message"]
    print(f"store lost: exit 1: {msg['message']}")
    adapter = run.out_dir / "adapter_model.safetensors"
    assert adapter.is_file()  # the adapter stays on the volume
    saved = adapter.read_bytes()

    # The operator's next attempt: same directories; the run is complete, so it only publishes and pushes.
    minio.start()
    env.pop(c.ENV_DEBUG_STEP_DELAY)
    again = TrainerRun(tmp_path, env, name="again")
    assert again.wait(240) == 0, again.output()[-4000:]
    msg = again.termination()
    assert msg["pushed"] == f"s3://{BUCKET}/{PREFIX}/" and "already complete at step 4/4" in msg["message"]
    assert _pushed(minio) == _local_files(again.out_dir)
    stored = minio.client().get_object(BUCKET, f"{PREFIX}/adapter_model.safetensors").read()
    assert stored == saved == adapter.read_bytes()

    # And once more (a pod killed after the push but before its status was recorded): same objects.
    first = {o.object_name: o.etag for o in minio.client().list_objects(BUCKET, recursive=True)}
    third = TrainerRun(tmp_path, env, name="third")
    assert third.wait(240) == 0, third.output()[-4000:]
    assert {o.object_name: o.etag for o in minio.client().list_objects(BUCKET, recursive=True)} == first

    # The README's way out after a failed job: a new job resuming from the last checkpoint only pushes.
    fresh = {**env, c.ENV_OUTPUT_DIR: str(tmp_path / "new" / "out"), c.ENV_CHECKPOINT_DIR: str(tmp_path / "new" / "ck"),
             c.ENV_RESUME_FROM: str(run.ckpt_dir / c.checkpoint_name(4)), c.ENV_PUSH_S3_PREFIX: "team-a/retry"}
    retry = TrainerRun(tmp_path, fresh, name="retry")
    assert retry.wait(240) == 0, retry.output()[-4000:]
    assert retry.termination()["pushed"] == f"s3://{BUCKET}/team-a/retry/" and not retry.losses()
    retried = {o.object_name.removeprefix("team-a/retry/"): o.etag
               for o in minio.client().list_objects(BUCKET, prefix="team-a/retry/", recursive=True)}
    assert retried["adapter_model.safetensors"] == first[f"{PREFIX}/adapter_model.safetensors"]
    shutil.rmtree(tmp_path / "minio-data", ignore_errors=True)


def test_a_write_only_credential_pushes(tmp_path, tiny_model, text_data, minio):
    """A MinIO user whose policy allows only s3:PutObject (and the bucket's location) on the bucket:
    the push works; the check's probe object cannot be removed, which is only a warning."""
    from minio.credentials import StaticProvider
    from minio.minioadmin import MinioAdmin

    admin = MinioAdmin(endpoint=f"127.0.0.1:{minio.port}", credentials=StaticProvider(ROOT_USER, ROOT_PASSWORD),
                       secure=False)
    admin.user_add("writer", "writer-secret-key")
    admin.policy_add("put-only", policy={"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": [f"arn:aws:s3:::{BUCKET}/*"]},
        {"Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": [f"arn:aws:s3:::{BUCKET}"]}]})
    admin.attach_policy(["put-only"], user="writer")
    env = _push_env(tmp_path, tiny_model, text_data, minio, max_steps=1)
    env.update({"AWS_ACCESS_KEY_ID": "writer", "AWS_SECRET_ACCESS_KEY": "writer-secret-key"})
    run = TrainerRun(tmp_path, env)
    assert run.wait(240) == 0, run.output()[-4000:]
    assert run.termination()["pushed"] == f"s3://{BUCKET}/{PREFIX}/"
    assert "push check: could not remove" in run.output() and "AccessDenied" in run.output()
    assert _pushed(minio) == {**_local_files(run.out_dir), ".finetune-push-check": 0}
